//! vmard's configuration file (`/etc/vmar/vmar.toml`); command-line options override it.
//!
//! ```toml
//! # Directories whose files may be captured (nothing may be captured without one).
//! image_roots = ["/var/lib/vmar/images", "/var/lib/libvirt/images"]
//! # Group whose members may use vmard's socket besides root.
//! socket_group = "vmar"
//! # Most device-mapper targets of one device table.
//! max_targets = 100000
//! # Capture raw images that appear in the image roots by themselves (off by default), once
//! # they stayed unchanged and closed for writing this many seconds.
//! auto_capture = true
//! auto_capture_settle = 30
//! # What to do with a device whose image changed under it: "fail-closed" (its extents read
//! # as EIO) or "report" (keep serving, state image-changed, logged at ERROR).
//! on_image_change = "fail-closed"
//! # Refuse opens for writing of images that live devices read (fanotify).
//! refuse_image_writes = true
//! # Hold images on another mount than the state directory beside themselves (.vmar-holds).
//! hold_beside_images = true
//! # Seconds between checks of the images live devices read, and blocks sampled from each
//! # block-device image per check.
//! image_check_interval = 10
//! image_check_samples = 64
//! # Digest sidecars on shared storage (off by default; see `crate::sidecar`): "read" imports
//! # valid ones, "write" also writes one for each image it hashes.
//! sidecars = "write"
//! sidecar_dir = "/srv/images/.vmar"        # default: beside each image, hidden
//! sidecar_key = "/etc/vmar/fleet.key"      # keyed MAC; without it, only own files are trusted
//! sidecar_sample = 0.001                   # fraction of blocks read to check an import
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/vmar/vmar.toml";

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub image_roots: Vec<PathBuf>,
    pub socket_group: Option<String>,
    pub max_targets: Option<u64>,
    /// Watch the image roots and capture new raw images (see [`crate::watch`]).
    #[serde(default)]
    pub auto_capture: bool,
    /// Seconds a new image must stay unchanged and closed for writing before auto-capture
    /// takes it [default: 30].
    pub auto_capture_settle: Option<f64>,
    /// What to do with devices whose image changed (see [`crate::guard`]) [default:
    /// fail-closed].
    #[serde(default)]
    pub on_image_change: crate::policy::Policy,
    /// Refuse opens for writing of served images [default: true].
    pub refuse_image_writes: Option<bool>,
    /// Hold images beside themselves where the state directory is on another mount (see
    /// [`crate::holds`]) [default: true; never with sidecars or on network file systems].
    pub hold_beside_images: Option<bool>,
    /// Seconds between image checks [default: 10].
    pub image_check_interval: Option<f64>,
    /// Blocks sampled per block-device image per check [default: 64].
    pub image_check_samples: Option<usize>,
    /// Digest sidecars: off (default), read or write ([`SidecarMode`]).
    pub sidecars: Option<SidecarMode>,
    /// Directory on the share holding the sidecars [default: beside each image].
    pub sidecar_dir: Option<PathBuf>,
    /// Fleet key file: sidecars are sealed and checked with a keyed MAC.
    pub sidecar_key: Option<PathBuf>,
    /// Fraction of an imported image's blocks read to check its sidecar [default: 0.001].
    pub sidecar_sample: Option<f64>,
    /// When vmard warms working sets by itself ([`crate::workset::Mode`]) [default: off].
    pub prefetch: Option<crate::workset::Mode>,
    /// Seconds after a device's first open at which vmard records its working set [default:
    /// 0, never].
    pub record_after: Option<f64>,
    /// Largest gap (bytes) a warm reads through to join two runs into one request
    /// [default: 131072].
    pub prefetch_merge_gap: Option<u64>,
}

/// Every key of the file: (key, value type, default, what it does). vmar.toml(5) is made
/// from it; a test checks that it names exactly the keys [`Config`] reads.
pub const KEYS: &[(&str, &str, &str, &str)] = &[
    (
        "image_roots",
        "array of absolute paths",
        "[] (nothing can be captured)",
        "Directories whose files (and block devices named there) may be captured, at any depth. A path is resolved once and the file opened with openat2(RESOLVE_BENEATH) from its root, so a symlink cannot lead out of it. vmard --image-root adds to them. The package's file names /var/lib/vmar/images. A SIGHUP (systemctl reload) re-reads it.",
    ),
    (
        "socket_group",
        "group name",
        "none (socket mode 0600: root only)",
        "Group whose members may use vmard's socket besides root: the socket becomes mode 0660, owned by that group. Applies at the next start, not on SIGHUP. vmard --socket-group overrides it.",
    ),
    (
        "max_targets",
        "integer",
        "100000",
        "Most device-mapper targets of one device table; a longer map gives up its least useful redirections to fit. Linux refuses tables of more than 1048576 targets. Applies to devices created or refreshed after a SIGHUP. vmard --max-targets overrides it.",
    ),
    (
        "auto_capture",
        "boolean",
        "false",
        "Watch the image roots (inotify, not their subdirectories) and capture a new raw image once it is complete: its name is final and it stayed unchanged and closed for writing auto_capture_settle seconds. Read at start only.",
    ),
    (
        "auto_capture_settle",
        "seconds (0 to 86400, fractions allowed)",
        "30",
        "How long a new file must stay unchanged (size, times, inode) and closed for writing before auto-capture takes it.",
    ),
    (
        "on_image_change",
        "\"fail-closed\" or \"report\"",
        "\"fail-closed\"",
        "What to do with a device whose image (its own, or one its map redirects into) changed after capture: fail-closed swaps its table, while open, for one whose extents of that image are dm error targets (the VM reads EIO there, the rest as before); report keeps serving what the image holds now. Either way the device shows state image-changed and vmard logs it at ERROR.",
    ),
    (
        "refuse_image_writes",
        "boolean",
        "true",
        "Make the kernel refuse opens for writing of images live devices read (fanotify permission events answered by vmard); refusals are logged with the process and the devices. Read at start.",
    ),
    (
        "hold_beside_images",
        "boolean",
        "true",
        "vmard keeps a hard link to every captured image file so that one deleted under live devices (Nova's _base) keeps its content. A link cannot cross a mount: where the state directory is on another mount (Nova's _base under the shipped unit), the link is made beside the image, in its directory's .vmar-holds. A link changes the image's inode change time for every reader, so it is never made with digest sidecars on or on a network or cluster file system, where other hosts read the image; false turns it off elsewhere too (several vmards sharing one local image directory). Read at start.",
    ),
    (
        "image_check_interval",
        "seconds",
        "10",
        "Seconds between checks of the images live devices read (writes fanotify reports are checked at once). The window in which a write nobody reports can be served.",
    ),
    (
        "image_check_samples",
        "integer",
        "64",
        "Blocks sampled from each block-device image per periodic check and compared with the catalog's digests.",
    ),
    (
        "sidecars",
        "\"off\", \"read\" or \"write\"",
        "\"off\"",
        "Digest sidecars on shared storage: read imports a valid sidecar instead of hashing the image (reading only a sample of its blocks); write also writes one for each image it hashes.",
    ),
    (
        "sidecar_dir",
        "absolute path",
        "beside each image, hidden",
        "Directory on the share that holds the sidecars, by image file name.",
    ),
    (
        "sidecar_key",
        "absolute path",
        "none (only sidecars owned by vmard's user and not writable by others are trusted)",
        "Fleet key file: sidecars are sealed and checked with a keyed BLAKE3 MAC, so only hosts holding the key write sidecars others accept.",
    ),
    (
        "sidecar_sample",
        "fraction (0 to 1)",
        "0.001",
        "Fraction of an imported image's blocks read and hashed to check its sidecar (at least one block).",
    ),
    (
        "prefetch",
        "\"off\" or \"create\"",
        "\"off\"",
        "Warm boot working sets by itself: create also reads, in the background after every successful vmarctl create and ensure (the libvirt hook's, at each domain start), the working sets of the device's image into the page cache (what vmarctl warm does; nothing without a recorded set). Applies from the next create after a SIGHUP.",
    ),
    (
        "record_after",
        "seconds (0 to 86400, fractions allowed; 0: never)",
        "0",
        "Record a device's working set (phase boot) this many seconds after its first open: the blocks read since the device was last closed whose pages are cached then (what vmarctl record does). vmard looks at the devices every 5 s. Applies after a SIGHUP.",
    ),
    (
        "prefetch_merge_gap",
        "bytes (0 to 8388608)",
        "131072",
        "Largest gap between two runs of a warm (vmarctl warm, prefetch = \"create\") that is read through to join them into one request: a request costs the disk a seek or an I/O operation, a gap costs its bytes. 0 reads exactly the working sets' union (no byte beyond it) in more requests. Applies to warms planned after a SIGHUP.",
    ),
];

/// What a host does with sidecars (`sidecars` in vmar.toml).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SidecarMode {
    /// Neither reads nor writes them (the default: trusting another host's digests is a
    /// decision for the operator).
    #[default]
    Off,
    /// Imports valid sidecars; hashes (and writes nothing) otherwise.
    Read,
    /// Imports valid sidecars; hashes and writes one when none is valid.
    Write,
}

/// Default of `auto_capture_settle`: long enough for a copy or download that pauses.
pub const DEFAULT_AUTO_CAPTURE_SETTLE: f64 = 30.0;

impl Config {
    /// How long auto-capture waits for a file to settle; rejects a negative or absurd value.
    pub fn auto_capture_settle(&self, path: &Path) -> Result<std::time::Duration> {
        let seconds = self
            .auto_capture_settle
            .unwrap_or(DEFAULT_AUTO_CAPTURE_SETTLE);
        std::time::Duration::try_from_secs_f64(seconds)
            .ok()
            .filter(|d| d.as_secs() <= 86_400)
            .ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "auto_capture_settle = {seconds}: give seconds between 0 and 86400"
                ),
            })
    }
}

impl Config {
    /// The prefetch settings: the mode, and when to record (`None`: never); rejects a
    /// negative or absurd `record_after`.
    pub fn prefetch(
        &self,
        path: &Path,
    ) -> Result<(crate::workset::Mode, Option<std::time::Duration>)> {
        let seconds = self.record_after.unwrap_or(0.0);
        let after = std::time::Duration::try_from_secs_f64(seconds)
            .ok()
            .filter(|d| d.as_secs() <= 86_400)
            .ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                message: format!("record_after = {seconds}: give seconds between 0 and 86400"),
            })?;
        Ok((
            self.prefetch.unwrap_or_default(),
            (!after.is_zero()).then_some(after),
        ))
    }

    /// `prefetch_merge_gap` in bytes; rejects a gap longer than a warm's largest request.
    pub fn prefetch_merge_gap(&self, path: &Path) -> Result<u64> {
        let gap = self
            .prefetch_merge_gap
            .unwrap_or(crate::workset::DEFAULT_MERGE_GAP);
        if gap > crate::workset::MAX_REQUEST {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "prefetch_merge_gap = {gap}: give bytes between 0 and {}",
                    crate::workset::MAX_REQUEST
                ),
            });
        }
        Ok(gap)
    }

    /// The image guard's settings; rejects an interval outside 0.1 s .. 1 day.
    pub fn guard(&self, path: &Path) -> Result<crate::policy::Settings> {
        let seconds = self
            .image_check_interval
            .unwrap_or(crate::policy::DEFAULT_INTERVAL);
        let interval = std::time::Duration::try_from_secs_f64(seconds)
            .ok()
            .filter(|d| d.as_secs_f64() >= 0.1 && d.as_secs() <= 86_400)
            .ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "image_check_interval = {seconds}: give seconds between 0.1 and 86400"
                ),
            })?;
        Ok(crate::policy::Settings {
            policy: self.on_image_change,
            interval,
            samples: self
                .image_check_samples
                .unwrap_or(crate::policy::DEFAULT_SAMPLES),
        })
    }

    /// Reads `path`. A missing file gives the defaults unless `required`.
    pub fn load(path: &Path, required: bool) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default());
            }
            Err(e) => return Err(Error::io("cannot read config", path, e)),
        };
        toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_keys_are_exactly_the_keys_read() {
        let value = serde_json::to_value(Config::default()).unwrap();
        let mut read: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut documented: Vec<&str> = KEYS.iter().map(|k| k.0).collect();
        read.sort_unstable();
        documented.sort_unstable();
        assert_eq!(read, documented);
    }

    #[test]
    fn config_files_parse_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmar.toml");
        assert_eq!(Config::load(&path, false).unwrap(), Config::default());
        assert!(Config::load(&path, true).is_err());
        std::fs::write(
            &path,
            "image_roots = [\"/a\", \"/b\"]\nsocket_group = \"vmar\"\nmax_targets = 5\n",
        )
        .unwrap();
        let config = Config::load(&path, false).unwrap();
        assert_eq!(
            config.image_roots,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert_eq!(config.socket_group.as_deref(), Some("vmar"));
        assert_eq!(config.max_targets, Some(5));
        assert!(!config.auto_capture);
        std::fs::write(&path, "auto_capture = true\nauto_capture_settle = 0.5\n").unwrap();
        let config = Config::load(&path, false).unwrap();
        assert!(config.auto_capture);
        assert_eq!(
            config.auto_capture_settle(&path).unwrap(),
            std::time::Duration::from_millis(500)
        );
        std::fs::write(&path, "auto_capture_settle = -1\n").unwrap();
        let config = Config::load(&path, false).unwrap();
        assert!(config.auto_capture_settle(&path).is_err());
        assert_eq!(
            config.guard(&path).unwrap(),
            crate::policy::Settings::default()
        );
        std::fs::write(
            &path,
            "on_image_change = \"report\"\nimage_check_interval = 0.5\nimage_check_samples = 8\nrefuse_image_writes = false\n",
        )
        .unwrap();
        let config = Config::load(&path, false).unwrap();
        let guard = config.guard(&path).unwrap();
        assert_eq!(guard.policy, crate::policy::Policy::Report);
        assert_eq!(guard.interval, std::time::Duration::from_millis(500));
        assert_eq!(guard.samples, 8);
        assert_eq!(config.refuse_image_writes, Some(false));
        std::fs::write(&path, "image_check_interval = 0\n").unwrap();
        assert!(Config::load(&path, false).unwrap().guard(&path).is_err());
        std::fs::write(&path, "on_image_change = \"ignore\"\n").unwrap();
        assert!(Config::load(&path, false).is_err());
        assert_eq!(
            config.prefetch(&path).unwrap(),
            (crate::workset::Mode::Off, None)
        );
        std::fs::write(&path, "prefetch = \"create\"\nrecord_after = 90\n").unwrap();
        let config = Config::load(&path, false).unwrap();
        assert_eq!(
            config.prefetch(&path).unwrap(),
            (
                crate::workset::Mode::Create,
                Some(std::time::Duration::from_secs(90))
            )
        );
        assert_eq!(
            config.prefetch_merge_gap(&path).unwrap(),
            crate::workset::DEFAULT_MERGE_GAP
        );
        std::fs::write(&path, "prefetch_merge_gap = 0\n").unwrap();
        let config = Config::load(&path, false).unwrap();
        assert_eq!(config.prefetch_merge_gap(&path).unwrap(), 0);
        std::fs::write(&path, "prefetch_merge_gap = 8388609\n").unwrap();
        let config = Config::load(&path, false).unwrap();
        assert!(config.prefetch_merge_gap(&path).is_err());
        std::fs::write(&path, "prefetch_merge_gap = -1\n").unwrap();
        assert!(Config::load(&path, false).is_err());
        std::fs::write(&path, "record_after = -3\n").unwrap();
        assert!(Config::load(&path, false).unwrap().prefetch(&path).is_err());
        std::fs::write(&path, "prefetch = \"always\"\n").unwrap();
        assert!(Config::load(&path, false).is_err());
        std::fs::write(&path, "image_root = [\"/a\"]\n").unwrap();
        let err = Config::load(&path, false).unwrap_err();
        assert_eq!(err.kind(), "config");
        assert!(err.to_string().contains("image_root"), "{err}");
    }
}
