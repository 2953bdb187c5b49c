//! qcow2 overlays over vmar devices, as qemu-img sees them: which vmar devices an image's
//! backing chain names (what the libvirt hook must ensure before QEMU opens it), and whether
//! an overlay is one `vmarctl libvirt-xml --overlay` may hand to libvirt (a qcow2 file whose
//! backing file is the device, declared raw, of the device's size).
//!
//! The checks are pure functions of `qemu-img info --output=json`; [`info`] runs qemu-img
//! (`-U`: a running VM holds its images locked) and [`create`] makes an overlay.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::hook::device_name;
use crate::name::DeviceName;

/// Longest backing chain followed: far more than any real chain, and a bound on loops.
const MAX_DEPTH: usize = 32;

/// One image of a chain, as `qemu-img info --output=json` describes it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    #[serde(default)]
    pub backing_filename: Option<String>,
    /// The backing file resolved against the image's directory (qemu-img does that).
    #[serde(default)]
    pub full_backing_filename: Option<String>,
    #[serde(default)]
    pub backing_filename_format: Option<String>,
}

impl ImageInfo {
    /// The backing file's path, absolute when qemu-img could resolve it.
    pub fn backing(&self) -> Option<&str> {
        self.full_backing_filename
            .as_deref()
            .or(self.backing_filename.as_deref())
    }
}

fn qemu_img_error(path: &Path, message: impl Into<String>) -> Error {
    Error::QemuImg {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Parses `qemu-img info --output=json` of one image.
pub fn parse_info(path: &Path, json: &str) -> Result<ImageInfo> {
    serde_json::from_str(json).map_err(|e| qemu_img_error(path, format!("unexpected output: {e}")))
}

/// Parses `qemu-img info --backing-chain --output=json`: the image first, its backing last.
pub fn parse_chain(path: &Path, json: &str) -> Result<Vec<ImageInfo>> {
    serde_json::from_str(json).map_err(|e| qemu_img_error(path, format!("unexpected output: {e}")))
}

/// Runs `qemu-img info -U --output=json [--backing-chain] PATH` and returns its output.
pub fn info(path: &Path, chain: bool) -> Result<String> {
    let mut command = Command::new("qemu-img");
    command.args(["info", "-U", "--output=json"]);
    if chain {
        command.arg("--backing-chain");
    }
    let out = run(command.arg(path), path)?;
    String::from_utf8(out).map_err(|_| qemu_img_error(path, "output is not UTF-8"))
}

/// The vmar devices the backing chain of `path` names, read one image at a time (so that a
/// missing device, which the hook is about to create, does not stop the walk): the walk
/// ends at a vmar device, a raw image or an image without a backing file.
pub fn chain_devices(path: &Path) -> Result<Vec<DeviceName>> {
    let mut devices = Vec::new();
    let mut next = Some(path.to_path_buf());
    for _ in 0..MAX_DEPTH {
        let Some(current) = next.take() else {
            return Ok(devices);
        };
        let info = parse_info(&current, &info(&current, false)?)?;
        let Some(backing) = info.backing() else {
            return Ok(devices);
        };
        if let Some(name) = device_name(backing) {
            devices.push(name);
            return Ok(devices);
        }
        if info.backing_filename_format.as_deref() == Some("raw") {
            return Ok(devices);
        }
        next = Some(resolve(&current, backing));
    }
    Err(qemu_img_error(
        path,
        format!("backing chain longer than {MAX_DEPTH} images (a loop?)"),
    ))
}

fn resolve(image: &Path, backing: &str) -> PathBuf {
    let backing = Path::new(backing);
    if backing.is_absolute() {
        return backing.to_path_buf();
    }
    image.parent().unwrap_or(Path::new("/")).join(backing)
}

fn mismatch(path: &Path, message: String) -> Error {
    Error::OverlayMismatch {
        path: path.to_path_buf(),
        message,
    }
}

/// Checks that `top` (`qemu-img info` of `overlay`, readable without its backing file) is a
/// qcow2 overlay directly over vmar device `name`, declared raw.
pub fn check_top(overlay: &Path, top: &ImageInfo, name: &str) -> Result<()> {
    if top.format != "qcow2" {
        return Err(mismatch(
            overlay,
            format!("is a {} image; an overlay must be qcow2", top.format),
        ));
    }
    let fix = format!(
        "point it at the device with `qemu-img rebase -u -b /dev/vmar/{name} -F raw {}` if it was made over the same content, or make a new one",
        overlay.display()
    );
    let Some(backing) = top.backing() else {
        return Err(mismatch(overlay, format!("has no backing file; {fix}")));
    };
    if device_name(backing).as_deref() != Some(name) {
        return Err(mismatch(
            overlay,
            format!("is backed by {backing}, not by /dev/vmar/{name}; {fix}"),
        ));
    }
    if top.backing_filename_format.as_deref() != Some("raw") {
        return Err(mismatch(
            overlay,
            format!(
                "does not declare its backing file raw (format {}); without it QEMU probes the guest's bytes for a format; {fix}",
                top.backing_filename_format.as_deref().unwrap_or("unset")
            ),
        ));
    }
    Ok(())
}

/// Checks the whole `chain` of `overlay` (`qemu-img info --backing-chain`, which opens the
/// device): [`check_top`], then a raw device of the image's `size` under it.
pub fn check_chain(overlay: &Path, chain: &[ImageInfo], name: &str, size: u64) -> Result<()> {
    let Some(top) = chain.first() else {
        return Err(mismatch(overlay, "qemu-img describes no image".into()));
    };
    check_top(overlay, top, name)?;
    match chain.get(1) {
        Some(base) if base.virtual_size != size => Err(mismatch(
            overlay,
            format!(
                "its backing file {} is {} bytes, the image of /dev/vmar/{name} {size}",
                base.filename, base.virtual_size
            ),
        )),
        Some(_) => Ok(()),
        None => Err(mismatch(
            overlay,
            "qemu-img did not open its backing file".into(),
        )),
    }
}

/// Creates a qcow2 overlay at `path` over vmar device `name` (which must be live: qemu-img
/// reads its size).
pub fn create(path: &Path, name: &str) -> Result<()> {
    let mut command = Command::new("qemu-img");
    command
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(crate::libvirt::device_path(name))
        .arg(path);
    run(&mut command, path).map(|_| ())
}

/// Runs qemu-img `command` about image `path`; its standard output, or its complaint.
fn run(command: &mut Command, path: &Path) -> Result<Vec<u8>> {
    let out = command.output().map_err(|e| {
        Error::io(
            "cannot run qemu-img (apt-get install qemu-utils) for",
            path,
            e,
        )
    })?;
    if !out.status.success() {
        return Err(qemu_img_error(
            path,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(
        format: &str,
        size: u64,
        backing: Option<&str>,
        backing_format: Option<&str>,
    ) -> ImageInfo {
        ImageInfo {
            filename: "x".into(),
            format: format.into(),
            virtual_size: size,
            backing_filename: backing.map(str::to_string),
            full_backing_filename: backing.map(str::to_string),
            backing_filename_format: backing_format.map(str::to_string),
        }
    }

    #[test]
    fn chain_checks_name_format_and_size() {
        let overlay = Path::new("/vm/a.qcow2");
        let good = [
            image("qcow2", 1 << 20, Some("/dev/vmar/web"), Some("raw")),
            image("raw", 1 << 20, None, None),
        ];
        check_chain(overlay, &good, "web", 1 << 20).unwrap();
        let by_mapper = [
            image("qcow2", 1 << 20, Some("/dev/mapper/vmar-web"), Some("raw")),
            good[1].clone(),
        ];
        check_chain(overlay, &by_mapper, "web", 1 << 20).unwrap();
        let kind = |chain: &[ImageInfo], size| {
            check_chain(overlay, chain, "web", size).unwrap_err().kind()
        };
        assert_eq!(kind(&good, 2 << 20), "overlay-mismatch");
        let other = [
            image("qcow2", 1 << 20, Some("/dev/vmar/db"), Some("raw")),
            good[1].clone(),
        ];
        assert_eq!(kind(&other, 1 << 20), "overlay-mismatch");
        let unformatted = [
            image("qcow2", 1 << 20, Some("/dev/vmar/web"), None),
            good[1].clone(),
        ];
        assert_eq!(kind(&unformatted, 1 << 20), "overlay-mismatch");
        assert_eq!(
            kind(&[image("raw", 1 << 20, None, None)], 1 << 20),
            "overlay-mismatch"
        );
        assert_eq!(
            kind(&[image("qcow2", 1 << 20, None, None)], 1 << 20),
            "overlay-mismatch"
        );
    }

    #[test]
    fn qemu_img_json_parses() {
        let json = r#"{"virtual-size": 16777216, "filename": "disk", "format": "qcow2",
            "actual-size": 200704, "full-backing-filename": "/var/lib/nova/instances/_base/abc",
            "backing-filename": "../_base/abc", "backing-filename-format": "raw",
            "dirty-flag": false}"#;
        let info = parse_info(Path::new("disk"), json).unwrap();
        assert_eq!(info.backing(), Some("/var/lib/nova/instances/_base/abc"));
        assert_eq!(info.virtual_size, 16 << 20);
        assert!(parse_chain(Path::new("disk"), json).is_err());
        assert_eq!(
            resolve(Path::new("/vm/i/disk"), "../_base/x"),
            PathBuf::from("/vm/i/../_base/x")
        );
    }
}
