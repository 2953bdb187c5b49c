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
//! # Digest sidecars on shared storage (off by default; see `crate::sidecar`): "read" imports
//! # valid ones, "write" also writes one for each image it hashes.
//! sidecars = "write"
//! sidecar_dir = "/srv/images/.vmar"        # default: beside each image, hidden
//! sidecar_key = "/etc/vmar/fleet.key"      # keyed MAC; without it, only own files are trusted
//! sidecar_sample = 0.001                   # fraction of blocks read to check an import
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/vmar/vmar.toml";

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
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
    /// Digest sidecars: off (default), read or write ([`crate::sidecar::Mode`]).
    pub sidecars: Option<crate::sidecar::Mode>,
    /// Directory on the share holding the sidecars [default: beside each image].
    pub sidecar_dir: Option<PathBuf>,
    /// Fleet key file: sidecars are sealed and checked with a keyed MAC.
    pub sidecar_key: Option<PathBuf>,
    /// Fraction of an imported image's blocks read to check its sidecar [default: 0.001].
    pub sidecar_sample: Option<f64>,
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
        std::fs::write(&path, "image_root = [\"/a\"]\n").unwrap();
        let err = Config::load(&path, false).unwrap_err();
        assert_eq!(err.kind(), "config");
        assert!(err.to_string().contains("image_root"), "{err}");
    }
}
