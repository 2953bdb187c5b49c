//! What the operator chose for images written under live devices (`on_image_change`,
//! `image_check_interval`, `image_check_samples` in vmar.toml), and the values in force
//! (set at start and on SIGHUP). A leaf: the configuration, the devices and the guard all
//! read it without importing each other.

use std::sync::RwLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What vmar does with a device whose image changed under it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Reads of the changed image's extents fail (EIO); the rest is served.
    #[default]
    FailClosed,
    /// The table stays: the device serves what the image holds now. Never silent: the
    /// device is `image-changed` and logged at ERROR.
    Report,
}

/// Default seconds between checks.
pub const DEFAULT_INTERVAL: f64 = 10.0;
/// Default blocks sampled per block-device image per periodic check.
pub const DEFAULT_SAMPLES: usize = 64;

/// The guard's settings (from vmar.toml; SIGHUP re-reads them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    pub policy: Policy,
    pub interval: Duration,
    pub samples: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            policy: Policy::FailClosed,
            interval: Duration::from_secs_f64(DEFAULT_INTERVAL),
            samples: DEFAULT_SAMPLES,
        }
    }
}

static SETTINGS: RwLock<Option<Settings>> = RwLock::new(None);

/// The settings in force.
pub fn settings() -> Settings {
    SETTINGS.read().ok().and_then(|s| *s).unwrap_or_default()
}

/// Puts `settings` in force (the guard's `set_settings` also makes it check at once).
pub fn store(settings: Settings) {
    if let Ok(mut s) = SETTINGS.write() {
        *s = Some(settings);
    }
}
