//! vmar's own hold on captured image files, so that an image deleted while devices read it
//! keeps its content until nothing needs it. OpenStack Nova's image cache manager deletes a
//! `_base` file once no instance disk backs onto that file, which is the case as soon as the
//! disks back onto `/dev/vmar/NAME`: without a hold, the open loop device keeps serving the
//! deleted inode until the next boot, and then the device cannot be restored.
//!
//! A hold is a hard link `$STATE_DIR/holds/DEV-INO` (device and inode in hex) made by vmard
//! from the open file (`linkat` of `/proc/self/fd/N`, so it is the inode that was opened,
//! whatever happens to its name meanwhile). A link needs one mount: where the state directory
//! is on another file system (or, under systemd's `ProtectSystem=`, another mount) than the
//! image, as for Nova's `/var/lib/nova/instances/_base`, the link is made beside the image in
//! a hidden `.vmar-holds` directory instead (`DEV-INO.ID`, ID the state dir's instance id, so
//! that vmards sharing an image directory each keep and release their own), and
//! `$STATE_DIR/holds/DEV-INO` is a symbolic link to it: the state directory still lists every
//! hold. Block devices are not held (deleting a node does not free a device).
//!
//! Identity: a link changes the inode's ctime, which is part of the identity that catches
//! writes hidden behind a restored mtime. So a capture makes the hold *before* the identity
//! is taken. Deleting or renaming the original name changes the ctime again; that is never
//! taken for granted: the held file is hashed again, and only if its content fingerprint is
//! the captured one is its identity recorded anew ([`open_captured`]). A write cannot pass:
//! any write changes the content (found by the hash) or happens after the new identity was
//! taken (found by ctime). Images captured before holds existed get theirs at the next start
//! ([`hold_older_images`]), proven the same way.
//!
//! A hold goes when nothing needs it ([`release_unneeded`]): its image is forgotten, or its
//! file is gone and no saved device reads it and no other image's map redirects into it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::catalog::{Catalog, ImageRecord};
use crate::error::{Error, Result};
use crate::image::{ImageFile, ImageIdentity, open_unchanged};
use crate::records::{ImageFileState, KeptBy};

/// Directory of the holds inside the state directory.
pub const HOLDS_DIR: &str = "holds";

/// Directory of the holds made beside images on another mount than the state directory.
pub const SIDE_HOLDS_DIR: &str = ".vmar-holds";

/// Why a block device image has no hold.
pub const BLOCK_DEVICE: &str = "a block device: vmar cannot hold it (deleting its node does not free the device; removing the volume does)";

/// Holds being made or proven right now (captures, older images): not orphans.
static PENDING: Mutex<BTreeSet<(u64, u64)>> = Mutex::new(BTreeSet::new());
/// Why an image (dev, ino) could not be held, for `images`.
static NOT_HELD: Mutex<BTreeMap<(u64, u64), String>> = Mutex::new(BTreeMap::new());
/// Whether holds may be made beside images (off while digest sidecars are: see
/// [`allow_beside`]).
static BESIDE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether vmard may hold images beside themselves. A link changes the inode's change time,
/// which is part of every other vmard's identity of that file: where several hosts read one
/// image directory (digest sidecars on shared storage), one host's hold would make the image
/// look changed to the others and their sidecars stale. So vmard turns it off when sidecars
/// are on; it is never done on a network or cluster file system either.
pub fn allow_beside(allowed: bool) {
    BESIDE.store(allowed, std::sync::atomic::Ordering::Relaxed);
}

/// File systems other hosts may share (statfs magic numbers): NFS, SMB/CIFS (both), Ceph,
/// FUSE (GlusterFS, CephFS-fuse and others), GFS2, OCFS2, Lustre, 9p, AFS, GPFS.
const SHARED_FILE_SYSTEMS: [nix::sys::statfs::FsType; 12] = [
    nix::sys::statfs::FsType(0x6969),
    nix::sys::statfs::FsType(0x517B),
    nix::sys::statfs::FsType(0xFF53_4D42),
    nix::sys::statfs::FsType(0xFE53_4D42),
    nix::sys::statfs::FsType(0x00C3_6400),
    nix::sys::statfs::FsType(0x6573_5546),
    nix::sys::statfs::FsType(0x0116_1970),
    nix::sys::statfs::FsType(0x7461_636F),
    nix::sys::statfs::FsType(0x0BD0_0BD0),
    nix::sys::statfs::FsType(0x0102_1997),
    nix::sys::statfs::FsType(0x5346_414F),
    nix::sys::statfs::FsType(0x4750_4653),
];

/// Why `dir` may not get holds beside images, if it may not.
fn beside_refused(dir: &Path) -> Option<String> {
    if !BESIDE.load(std::sync::atomic::Ordering::Relaxed) {
        return Some(
            "digest sidecars are on (images on shared storage): a hold beside the image would \
             change its inode change time for every other host"
                .to_string(),
        );
    }
    match nix::sys::statfs::statfs(dir) {
        Ok(fs) if SHARED_FILE_SYSTEMS.contains(&fs.filesystem_type()) => Some(format!(
            "{} is on a network or cluster file system (type {:#x}): a hold beside the image \
             would change its inode change time for every other host",
            dir.display(),
            fs.filesystem_type().0
        )),
        _ => None,
    }
}

/// The holds of one state directory.
#[derive(Clone, Debug)]
pub struct Holds {
    dir: PathBuf,
    /// What this state directory's holds beside images end with: its instance id, so that
    /// several vmards (hosts sharing an image directory over NFS, or two state dirs on one
    /// host) each keep their own link and release only their own.
    tag: String,
}

/// A hold in the making: not released as an orphan until dropped.
#[derive(Debug)]
pub struct Pending {
    key: (u64, u64),
}

impl Pending {
    fn new(key: (u64, u64)) -> Option<Pending> {
        let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
        pending.insert(key).then_some(Pending { key })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        PENDING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

fn is_pending(key: (u64, u64)) -> bool {
    PENDING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&key)
}

fn note_not_held(key: (u64, u64), why: String) {
    NOT_HELD
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, why);
}

/// What [`Holds::hold`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Held {
    /// Held now (true: the link was made by this call).
    Yes(bool),
    /// Not held, and why.
    No(String),
}

impl Holds {
    pub fn of(state_dir: &Path) -> Holds {
        let id = std::fs::read_to_string(state_dir.join(crate::instance::INSTANCE_FILE))
            .ok()
            .and_then(|text| crate::instance::InstanceId::parse(text.trim()));
        let tag = match id {
            Some(id) => id.as_str().to_string(),
            // No id yet (a state dir vmard has not started in): one from its path.
            None => {
                blake3::hash(state_dir.as_os_str().as_encoded_bytes()).to_hex()[..16].to_string()
            }
        };
        Holds {
            dir: state_dir.join(HOLDS_DIR),
            tag,
        }
    }

    /// How many links of the file with device `dev` and inode `ino` at `image` are vmar's
    /// holds: this state directory's own, and those beside the image (any vmard's, in the
    /// image directory's `.vmar-holds`). A link anyone else made elsewhere is never counted,
    /// so capture's hard-link refusal still sees it.
    pub fn hold_links(&self, image: &Path, dev: u64, ino: u64) -> u64 {
        let is_it = |m: &std::fs::Metadata| m.is_file() && m.dev() == dev && m.ino() == ino;
        let own = std::fs::symlink_metadata(self.path(dev, ino)).is_ok_and(|m| is_it(&m));
        let beside = image
            .parent()
            .map(|parent| parent.join(SIDE_HOLDS_DIR))
            .filter(|dir| std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()))
            .and_then(|dir| std::fs::read_dir(dir).ok())
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| std::fs::symlink_metadata(e.path()).is_ok_and(|m| is_it(&m)))
                    .count() as u64
            })
            .unwrap_or(0);
        u64::from(own) + beside
    }

    /// The hold's name of the file with device `dev` and inode `ino`.
    pub fn path(&self, dev: u64, ino: u64) -> PathBuf {
        self.dir.join(format!("{dev:x}-{ino:x}"))
    }

    fn path_of(&self, identity: &ImageIdentity) -> PathBuf {
        self.path(identity.dev, identity.ino)
    }

    /// Where the hold of (dev, ino) is: its name in the state directory, or the file beside
    /// the image that name points to.
    pub fn location(&self, dev: u64, ino: u64) -> PathBuf {
        let path = self.path(dev, ino);
        self.side_target(&path).unwrap_or(path)
    }

    /// Whether vmar holds the file with device `dev` and inode `ino` (a link in the state
    /// directory, or one beside the image that the state directory points to).
    pub fn holds(&self, dev: u64, ino: u64) -> bool {
        let path = self.path(dev, ino);
        let is_it = |m: std::fs::Metadata| m.is_file() && m.dev() == dev && m.ino() == ino;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => self
                .side_target(&path)
                .and_then(|target| std::fs::symlink_metadata(target).ok())
                .is_some_and(is_it),
            Ok(m) => is_it(m),
            Err(_) => false,
        }
    }

    /// The name of this state directory's hold beside an image, for the hold named `name`
    /// in the state directory.
    fn side_name(&self, name: &std::ffi::OsStr) -> std::ffi::OsString {
        let mut side = name.to_os_string();
        side.push(".");
        side.push(&self.tag);
        side
    }

    /// Where the state directory's symbolic link `path` points, if it names this state
    /// directory's hold beside an image (an absolute `.../.vmar-holds/NAME.TAG`).
    fn side_target(&self, path: &Path) -> Option<PathBuf> {
        let target = std::fs::read_link(path).ok()?;
        let dir = target.parent()?;
        let ok = target.is_absolute()
            && target.file_name() == Some(self.side_name(path.file_name()?).as_os_str())
            && dir.file_name() == Some(std::ffi::OsStr::new(SIDE_HOLDS_DIR));
        ok.then_some(target)
    }

    /// Holds `image` beside itself (`DIR/.vmar-holds/DEV-INO`) and points the state
    /// directory's hold at it. The side directory must be vmar's own (a directory, not a
    /// symbolic link, owned by vmard's user): anyone else's could take the link elsewhere.
    fn hold_beside(
        &self,
        image: &ImageFile,
        from: &Path,
        path: &Path,
    ) -> std::result::Result<(), String> {
        let Some(parent) = image.path.parent() else {
            return Err("the image path has no directory".to_string());
        };
        if let Some(why) = beside_refused(parent) {
            return Err(format!(
                "{} is on another mount than the image, and {why}",
                self.dir.display()
            ));
        }
        let dir = parent.join(SIDE_HOLDS_DIR);
        let readonly = |e: &dyn std::fmt::Display| {
            format!(
                "{} is on another mount than the image, and a hold beside it in {} cannot be \
                 made ({e}); under systemd, make the image directory writable to vmard \
                 (`systemctl edit vmard`: ReadWritePaths={})",
                self.dir.display(),
                dir.display(),
                parent.display()
            )
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(readonly(&e)),
        }
        let meta = std::fs::symlink_metadata(&dir).map_err(|e| readonly(&e))?;
        if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(format!(
                "{} is not vmar's own directory (a directory owned by uid {}): not used",
                dir.display(),
                nix::unistd::geteuid()
            ));
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| readonly(&e))?;
        let Some(name) = path.file_name() else {
            return Err(format!("{} has no file name", path.display()));
        };
        let side = dir.join(self.side_name(name));
        match link_open_file(from, &side) {
            Ok(()) => {}
            Err(nix::errno::Errno::ENOENT) => {
                return Err("deleted before vmar could hold it".to_string());
            }
            Err(e) => return Err(readonly(&e)),
        }
        sync_dir(&dir).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(path);
        if let Err(e) = std::os::unix::fs::symlink(&side, path) {
            let _ = std::fs::remove_file(&side);
            return Err(format!(
                "cannot point {} at {}: {e}",
                path.display(),
                side.display()
            ));
        }
        sync_dir(&self.dir).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Holds the open image `image` (a hard link from its descriptor), unless it is held
    /// already. What cannot be held is said, not failed: the image is still served.
    pub fn hold(&self, image: &ImageFile) -> Result<Held> {
        let id = &image.identity;
        if image.is_block_device {
            return Ok(Held::No(BLOCK_DEVICE.to_string()));
        }
        if self.holds(id.dev, id.ino) {
            return Ok(Held::Yes(false));
        }
        std::fs::create_dir_all(&self.dir)
            .and_then(|()| {
                std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| Error::io("cannot create", &self.dir, e))?;
        let path = self.path_of(id);
        let from = format!("/proc/self/fd/{}", image.file.as_raw_fd());
        let why = match link_open_file(Path::new(&from), &path) {
            Ok(()) => {
                sync_dir(&self.dir)?;
                return Ok(Held::Yes(true));
            }
            Err(nix::errno::Errno::EXDEV) => match self.hold_beside(image, Path::new(&from), &path)
            {
                Ok(()) => return Ok(Held::Yes(true)),
                Err(why) => why,
            },
            Err(nix::errno::Errno::ENOENT) => "deleted before vmar could hold it".to_string(),
            Err(e) => format!("cannot link it into {}: {e}", self.dir.display()),
        };
        tracing::warn!(image = %image.path.display(), "not held: {why}");
        note_not_held((id.dev, id.ino), why.clone());
        Ok(Held::No(why))
    }

    /// Removes the hold of (dev, ino); true if there was one.
    pub fn release(&self, dev: u64, ino: u64) -> Result<bool> {
        let path = self.path(dev, ino);
        if let Some(side) = self.side_target(&path) {
            match std::fs::remove_file(&side) {
                Ok(()) => {
                    if let Some(dir) = side.parent() {
                        sync_dir(dir)?;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("cannot release hold", &side, e)),
            }
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.dir)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("cannot release hold", &path, e)),
        }
    }

    /// Every hold: (dev, ino) from its name.
    pub fn list(&self) -> Result<Vec<(u64, u64)>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("cannot read", &self.dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("cannot read", &self.dir, e))?;
            let name = entry.file_name();
            let parsed = name
                .to_str()
                .and_then(|n| n.split_once('-'))
                .and_then(|(d, i)| {
                    Some((
                        u64::from_str_radix(d, 16).ok()?,
                        u64::from_str_radix(i, 16).ok()?,
                    ))
                });
            if let Some(key) = parsed {
                out.push(key);
            }
        }
        Ok(out)
    }

    /// The held file of `identity`, opened read-only, if vmar holds that inode.
    pub fn open(&self, identity: &ImageIdentity) -> Result<Option<ImageFile>> {
        let path = self.location(identity.dev, identity.ino);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("cannot open", &path, e)),
        };
        let image = ImageFile::from_file(path, file)?;
        let same = image.identity.dev == identity.dev && image.identity.ino == identity.ino;
        Ok(same.then_some(image))
    }
}

/// Links the open file `/proc/self/fd/N` (`from`) as `to`. A name `to` already there is
/// left of an inode that no longer exists (a file system made anew; callers look for their
/// own hold first): it is replaced.
fn link_open_file(from: &Path, to: &Path) -> nix::Result<()> {
    let link = || nix::unistd::linkat(None, from, None, to, nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW);
    match link() {
        Err(nix::errno::Errno::EEXIST) => {
            let _ = std::fs::remove_file(to);
            link()
        }
        made => made,
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("cannot sync", dir, e))
}

/// Whether `path` still names the file `identity` identifies (whatever its times).
fn names(path: &Path, identity: &ImageIdentity) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.dev() == identity.dev && m.ino() == identity.ino)
}

/// A path that reads image `record`'s captured file now: its own while it names that file,
/// else vmar's hold on it (for page-cache figures; serving goes through [`open_captured`]).
pub fn current_path(catalog: &Catalog, record: &ImageRecord) -> PathBuf {
    let id = &record.identity;
    if id.is_block_device() || names(&record.path, id) {
        return record.path.clone();
    }
    let holds = Holds::of(catalog.dir());
    if holds.holds(id.dev, id.ino) {
        holds.location(id.dev, id.ino)
    } else {
        record.path.clone()
    }
}

/// Makes the hold of an image about to be captured, before its identity is taken (the link
/// changes its ctime): `image.identity` is taken again after it. Nothing is held for an image
/// captured already with this identity (a no-op capture), nor for one the capture would
/// refuse as changed. The returned guard keeps the hold from being released as an orphan
/// until the capture is done.
pub fn prepare_capture(
    catalog: &Catalog,
    image: &mut ImageFile,
    recapture: bool,
) -> Result<Option<Pending>> {
    if image.is_block_device {
        return Ok(None);
    }
    let key = (image.identity.dev, image.identity.ino);
    if let Some(record) = catalog.image_at(&image.path)?
        && (record.identity == image.identity || !recapture)
    {
        return Ok(None);
    }
    // An older image being held and proven right now: its identity is moving.
    let Some(pending) = Pending::new(key) else {
        return Err(Error::Busy(format!(
            "{} is being held by vmar right now; retry",
            image.path.display()
        )));
    };
    if let Held::Yes(true) = Holds::of(catalog.dir()).hold(image)? {
        image.identity = image.current_identity()?;
        image.size = image.identity.size;
    }
    Ok(Some(pending))
}

/// After a capture: a hold made for it that no image record took is released.
pub fn finish_capture(catalog: &Catalog, pending: Option<Pending>, image: &ImageFile) {
    let Some(pending) = pending else {
        return;
    };
    let id = &image.identity;
    let taken = catalog.images().map(|all| {
        all.iter()
            .any(|r| r.identity.dev == id.dev && r.identity.ino == id.ino)
    });
    drop(pending);
    if let Ok(false) = taken
        && let Err(e) = Holds::of(catalog.dir()).release(id.dev, id.ino)
    {
        tracing::warn!("{e}");
    }
}

/// Opens captured image `record` for serving: its file if it is still the captured version;
/// else, if its name is gone (deleted, renamed, or naming another file now) and vmar holds
/// the captured inode, the held file. A held file whose ctime moved (the name's unlink) is
/// hashed again first and served only if its content is the captured one; its identity is
/// then recorded anew. Call with device changes serialised.
pub fn open_captured(catalog: &Catalog, record: &ImageRecord) -> Result<ImageFile> {
    let held = match find_captured(catalog, record)? {
        Found::File(file) => return Ok(file),
        Found::Held(held, _) => held,
    };
    if held.identity == record.identity {
        return Ok(held);
    }
    if !only_ctime_moved(&held, record) {
        return Err(Error::ImageChanged {
            name: record.name.clone(),
            path: record.path.clone(),
            what: format!(
                "its held copy changed: {}",
                record.identity.describe_change(&held.identity)
            ),
        });
    }
    prove(catalog, record, held)
}

/// Whether captured image `record` is still served as captured, changing nothing (no hash,
/// no record): its file unchanged, or, its name gone, vmar's hold on the captured inode with
/// the captured size and mtime (a ctime moved by the name's deletion is proven by hashing at
/// the next create, refresh or restore, see [`open_captured`]). For `vmarctl check`.
pub fn check_captured(catalog: &Catalog, record: &ImageRecord) -> Result<()> {
    match find_captured(catalog, record)? {
        Found::File(_) => Ok(()),
        Found::Held(held, _) if only_ctime_moved(&held, record) => Ok(()),
        Found::Held(_, error) => Err(error),
    }
}

/// What reads captured image `record` now.
enum Found {
    /// Its file, still the captured version.
    File(ImageFile),
    /// vmar's hold on the captured inode, its identity as it is now, where the name no
    /// longer names that inode (deleted, renamed, naming another file); and what the name
    /// said.
    Held(ImageFile, Error),
}

/// `record`'s file if it is the captured version, else vmar's hold on the captured inode
/// once the name has gone; else why neither.
fn find_captured(catalog: &Catalog, record: &ImageRecord) -> Result<Found> {
    let error = match open_unchanged(&record.name, &record.path, &record.identity) {
        Ok(file) => return Ok(Found::File(file)),
        Err(e @ Error::ImageChanged { .. }) => e,
        Err(e) => return Err(e),
    };
    // A file changed in place is changed, whatever vmar holds.
    if record.identity.is_block_device() || names(&record.path, &record.identity) {
        return Err(error);
    }
    match Holds::of(catalog.dir()).open(&record.identity)? {
        Some(held) => Ok(Found::Held(held, error)),
        None => Err(error),
    }
}

/// Whether `held` has the captured size and mtime (its ctime may have moved: the name's
/// deletion moves it).
fn only_ctime_moved(held: &ImageFile, record: &ImageRecord) -> bool {
    held.identity.size == record.identity.size && held.identity.mtime_ns == record.identity.mtime_ns
}

/// Hashes `held` again and records its identity as `record`'s if the content is the
/// captured one.
fn prove(catalog: &Catalog, record: &ImageRecord, held: ImageFile) -> Result<ImageFile> {
    let started = std::time::Instant::now();
    let fingerprint = catalog.content_fingerprint(&held)?;
    let now = held.current_identity()?;
    let changed = |what: String| Error::ImageChanged {
        name: record.name.clone(),
        path: record.path.clone(),
        what,
    };
    if now != held.identity {
        return Err(changed(format!(
            "its held copy changed while it was checked: {}",
            held.identity.describe_change(&now)
        )));
    }
    let want = catalog.captured_fingerprint(record)?;
    if fingerprint != want {
        return Err(changed(
            "its held copy's content is not the captured one (written before its name went)"
                .to_string(),
        ));
    }
    catalog.set_identity(record.id, held.identity)?;
    tracing::info!(
        image = %record.name,
        took = ?started.elapsed(),
        "content of the held file proven; its identity recorded anew"
    );
    Ok(held)
}

/// What keeps each image: saved devices that read it (its own or through their maps'
/// redirects) and images whose maps redirect into it, by image name.
pub fn kept_by(catalog: &Catalog) -> Result<BTreeMap<String, KeptBy>> {
    let mut kept: BTreeMap<String, KeptBy> = BTreeMap::new();
    let images = catalog.images()?;
    let name_of: BTreeMap<u32, String> = images.iter().map(|i| (i.id, i.name.clone())).collect();
    for device in catalog.devices()? {
        let (record, map) = match catalog.map(&device.image) {
            Ok(found) => found,
            Err(Error::UnknownImage { .. }) => continue,
            Err(e) => return Err(e),
        };
        let mut read = vec![record.name];
        read.extend(
            map.referenced_images()
                .into_iter()
                .filter_map(|id| name_of.get(&id).cloned()),
        );
        for image in read {
            let entry = kept.entry(image).or_default();
            if !entry.devices.contains(&device.name) {
                entry.devices.push(device.name.clone());
            }
        }
    }
    for image in &images {
        let redirecting = catalog.images_redirecting_to(image.id)?;
        if !redirecting.is_empty() {
            kept.entry(image.name.clone()).or_default().images = redirecting
                .into_iter()
                .filter_map(|id| name_of.get(&id).cloned())
                .collect();
        }
    }
    Ok(kept)
}

/// Where each image's file stands, in the order of `images`.
pub fn file_states(catalog: &Catalog, images: &[ImageRecord]) -> Result<Vec<ImageFileState>> {
    let holds = Holds::of(catalog.dir());
    let mut kept = kept_by(catalog)?;
    let holds_dev = std::fs::metadata(catalog.dir()).ok().map(|m| m.dev());
    Ok(images
        .iter()
        .map(|record| {
            let id = &record.identity;
            let present = match id.block_device() {
                Some(_) => {
                    use std::os::unix::fs::FileTypeExt;
                    std::fs::metadata(&record.path)
                        .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == id.dev)
                }
                None => names(&record.path, id),
            };
            let held = !id.is_block_device() && holds.holds(id.dev, id.ino);
            let not_held = if held {
                None
            } else if id.is_block_device() {
                Some(BLOCK_DEVICE.to_string())
            } else if let Some(why) = NOT_HELD
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(id.dev, id.ino))
            {
                Some(why.clone())
            } else if holds_dev.is_some_and(|d| d != id.dev) {
                Some(format!(
                    "the state directory {} is on another file system than the image",
                    catalog.dir().display()
                ))
            } else if present {
                Some("not held yet (held at the next start)".to_string())
            } else {
                Some("released: nothing needed it".to_string())
            };
            ImageFileState {
                state: if present { "present" } else { "gone" }.to_string(),
                hold: held.then(|| holds.location(id.dev, id.ino)),
                not_held,
                kept_by: kept.remove(&record.name).unwrap_or_default(),
            }
        })
        .collect())
}

/// Releases every hold nothing needs: of no image in the catalog (forgotten, or left by an
/// interrupted capture), or of an image whose file is gone that no saved device reads and
/// no map redirects into. Returns the image names (or hold names) released. Call with device
/// changes serialised.
pub fn release_unneeded(catalog: &Catalog) -> Result<Vec<String>> {
    let holds = Holds::of(catalog.dir());
    let held = holds.list()?;
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let images = catalog.images()?;
    let mut kept = None;
    let mut released = Vec::new();
    for (dev, ino) in held {
        if is_pending((dev, ino)) {
            continue;
        }
        // Every image of that inode (a file captured again under another name shares it).
        let records: Vec<&ImageRecord> = images
            .iter()
            .filter(|r| {
                !r.identity.is_block_device() && r.identity.dev == dev && r.identity.ino == ino
            })
            .collect();
        let label = if records.is_empty() {
            format!("{dev:x}-{ino:x} (no image)")
        } else {
            if records.iter().any(|r| names(&r.path, &r.identity)) {
                continue;
            }
            if kept.is_none() {
                kept = Some(kept_by(catalog)?);
            }
            let needed = records.iter().any(|r| {
                kept.as_ref()
                    .and_then(|k| k.get(&r.name))
                    .is_some_and(|k| !k.devices.is_empty() || !k.images.is_empty())
            });
            if needed {
                continue;
            }
            records
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        if holds.release(dev, ino)? {
            tracing::info!(image = %label, "hold released: its file is gone and nothing reads it");
            released.push(label);
        }
    }
    Ok(released)
}

/// Holds the images captured before holds existed (older catalogs), each proven by hashing
/// it again after the link (see the module doc). Takes `serialise` (the device-change lock)
/// per image. Returns how many were held.
pub fn hold_older_images<G>(catalog: &Catalog, serialise: impl Fn() -> G) -> Result<usize> {
    let holds = Holds::of(catalog.dir());
    let mut count = 0;
    for record in catalog.images()? {
        let id = record.identity;
        if id.is_block_device() || holds.holds(id.dev, id.ino) || crate::shutdown::requested() {
            continue;
        }
        let _changes = serialise();
        // Only the captured version, as it is now under its name.
        let Ok(file) = open_unchanged(&record.name, &record.path, &id) else {
            continue;
        };
        let Some(_pending) = Pending::new((id.dev, id.ino)) else {
            continue;
        };
        if holds.hold(&file)? != Held::Yes(true) {
            continue;
        }
        let held = ImageFile::from_file(file.path.clone(), file.file)?;
        match prove(catalog, &record, held) {
            Ok(_) => count += 1,
            Err(e) => {
                tracing::error!(image = %record.name, "not held: {e}");
                holds.release(id.dev, id.ino)?;
            }
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn write(path: &Path) {
        let bytes: Vec<u8> = (1..=8u8).flat_map(|b| [b; 4096]).collect();
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn images_captured_before_holds_are_held_once_proven_and_outlive_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.raw");
        write(&path);
        let state = dir.path().join("state");
        let catalog = Catalog::open(&state).unwrap();
        // Captured as a vmar without holds did: no link.
        let image = ImageFile::open(&path).unwrap();
        let (dev, ino) = (image.identity.dev, image.identity.ino);
        catalog.capture(&image, None, false, &mut |_| {}).unwrap();
        let holds = Holds::of(&state);
        assert!(!holds.holds(dev, ino));
        let before = catalog.image("img").unwrap().identity;
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(hold_older_images(&catalog, || ()).unwrap(), 1);
        assert!(holds.holds(dev, ino));
        // The link moved the ctime; the identity recorded is the one after it, proven.
        let after = catalog.image("img").unwrap().identity;
        assert_ne!(before.ctime_ns, after.ctime_ns);
        assert!(open_captured(&catalog, &catalog.image("img").unwrap()).is_ok());
        // Its name goes: served from the hold, once proven again.
        std::fs::remove_file(&path).unwrap();
        let held = open_captured(&catalog, &catalog.image("img").unwrap()).unwrap();
        assert_eq!(held.path, holds.path(dev, ino));
        assert_eq!(
            catalog.content_fingerprint(&held).unwrap(),
            catalog.image("img").unwrap().fingerprint.unwrap()
        );
        // Nothing reads it and no map redirects into it: released.
        assert_eq!(release_unneeded(&catalog).unwrap(), ["img"]);
        assert!(!holds.holds(dev, ino));
        assert!(open_captured(&catalog, &catalog.image("img").unwrap()).is_err());
    }

    #[test]
    fn a_held_file_written_and_then_unnamed_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.raw");
        write(&path);
        let state = dir.path().join("state");
        let catalog = Catalog::open(&state).unwrap();
        let mut image = ImageFile::open(&path).unwrap();
        let pending = prepare_capture(&catalog, &mut image, false).unwrap();
        catalog.capture(&image, None, false, &mut |_| {}).unwrap();
        finish_capture(&catalog, pending, &image);
        assert!(Holds::of(&state).holds(image.identity.dev, image.identity.ino));
        // Same size, mtime put back, then the name goes: only the content can tell.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_at(&[0xee; 4096], 4096).unwrap();
        file.set_modified(mtime).unwrap();
        std::fs::remove_file(&path).unwrap();
        let err = open_captured(&catalog, &catalog.image("img").unwrap()).unwrap_err();
        assert!(err.to_string().contains("not the captured one"), "{err}");
        // And the record keeps its old identity: nothing was re-established.
        assert_eq!(catalog.image("img").unwrap().identity, image.identity);
    }

    #[test]
    fn what_cannot_be_held_is_said() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.raw");
        write(&path);
        let image = ImageFile::open(&path).unwrap();
        let state = dir.path().join("state");
        assert_eq!(Holds::of(&state).hold(&image).unwrap(), Held::Yes(true));
        assert_eq!(Holds::of(&state).hold(&image).unwrap(), Held::Yes(false));
    }

    /// A state directory on another file system than the image: /dev/shm (tmpfs), where the
    /// test's directory is not on it.
    fn state_on_another_file_system(dir: &Path) -> Option<tempfile::TempDir> {
        let shm = Path::new("/dev/shm");
        let other =
            std::fs::metadata(shm).is_ok_and(|m| m.dev() != std::fs::metadata(dir).unwrap().dev());
        if !other {
            eprintln!("/dev/shm is on the test directory's file system: not tested");
        }
        other.then(|| tempfile::tempdir_in(shm).unwrap())
    }

    #[test]
    fn an_image_on_another_file_system_is_held_beside_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.raw");
        write(&path);
        let Some(state) = state_on_another_file_system(dir.path()) else {
            return;
        };
        let holds = Holds::of(state.path());
        let image = ImageFile::open(&path).unwrap();
        let id = image.identity;
        assert_eq!(holds.hold(&image).unwrap(), Held::Yes(true));
        assert_eq!(holds.hold(&image).unwrap(), Held::Yes(false));
        assert!(holds.holds(id.dev, id.ino));
        let side = holds.location(id.dev, id.ino);
        assert_eq!(
            side.parent(),
            Some(dir.path().join(SIDE_HOLDS_DIR).as_path())
        );
        let name = side.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.starts_with(&format!("{:x}-{:x}.", id.dev, id.ino)),
            "{name}"
        );
        let meta = std::fs::symlink_metadata(&side).unwrap();
        assert!(meta.is_file() && meta.ino() == id.ino);
        assert!(
            std::fs::symlink_metadata(holds.path(id.dev, id.ino))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(holds.list().unwrap(), vec![(id.dev, id.ino)]);
        // The name goes: the hold beside it still opens the captured inode.
        std::fs::remove_file(&path).unwrap();
        let held = holds.open(&id).unwrap().expect("held");
        assert_eq!((held.identity.dev, held.identity.ino), (id.dev, id.ino));
        assert_eq!(held.path, side);
        assert!(holds.release(id.dev, id.ino).unwrap());
        assert!(!side.exists() && !holds.holds(id.dev, id.ino));
        assert!(holds.list().unwrap().is_empty());
    }

    #[test]
    fn a_side_holds_directory_that_is_not_vmars_own_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.raw");
        write(&path);
        let Some(state) = state_on_another_file_system(dir.path()) else {
            return;
        };
        // Someone else's .vmar-holds (a symbolic link elsewhere) would take the link there.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(SIDE_HOLDS_DIR)).unwrap();
        let image = ImageFile::open(&path).unwrap();
        match Holds::of(state.path()).hold(&image).unwrap() {
            Held::No(why) => assert!(why.contains("not vmar's own directory"), "{why}"),
            Held::Yes(_) => panic!("held through someone else's directory"),
        }
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        assert!(!Holds::of(state.path()).holds(image.identity.dev, image.identity.ino));
    }
}
