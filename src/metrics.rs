//! What `vmarctl metrics` prints: vmard's devices, images, catalog and last restore in the
//! Prometheus text exposition format (0.0.4), the format node_exporter's textfile collector
//! reads. Pure: the service gathers a [`Snapshot`], [`render`] only formats it, so every line
//! is tested without a kernel.
//!
//! Device states are exported as they are (a label), not from a fixed list: a state added
//! later shows up without a change here.

use std::fmt::Write as _;

use crate::protocol::{DeviceStatus, RestoreStatus, StatsReport};

/// One captured image as monitoring sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageHealth {
    pub name: String,
    pub size: u64,
    /// Bytes of its blocks read from another image's canonical copy.
    pub shared: u64,
    /// Its file no longer exists.
    pub missing: bool,
    /// Its file is not the version that was captured.
    pub changed: bool,
}

/// Everything the metrics are made of.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub devices: Vec<DeviceStatus>,
    /// Read and cache figures of the live devices (absent without a kernel).
    pub stats: Option<StatsReport>,
    pub images: Vec<ImageHealth>,
    /// Bytes of the catalog's files in the state directory.
    pub catalog_bytes: u64,
    pub restore: RestoreStatus,
}

/// Escapes a label value (backslash, double quote, line feed).
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A metric family being written: HELP and TYPE once, then samples.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out, name }
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{}", self.name);
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn flag(b: bool) -> u8 {
    u8::from(b)
}

/// The metrics of `snapshot`, one family after another, each family's samples together.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    Family::new(&mut out, "vmar_up", "gauge", "Whether vmard answered (1).").sample(&[], 1);

    let mut f = Family::new(
        &mut out,
        "vmar_device_state",
        "gauge",
        "1 for each vmar device, with its state as a label (active, missing, differs, ...).",
    );
    for d in &snapshot.devices {
        f.sample(
            &[
                ("device", &d.name),
                ("node", &d.node),
                ("image", d.image.as_deref().unwrap_or("")),
                ("state", &d.state),
            ],
            1,
        );
    }
    let mut f = Family::new(
        &mut out,
        "vmar_device_active",
        "gauge",
        "Whether the device serves its image's current map (state active).",
    );
    for d in &snapshot.devices {
        f.sample(&[("device", &d.name)], flag(d.state == "active"));
    }
    let mut f = Family::new(
        &mut out,
        "vmar_device_open",
        "gauge",
        "Users that have the device open (a running VM holds it open).",
    );
    for d in &snapshot.devices {
        if let Some(live) = &d.live {
            f.sample(&[("device", &d.name)], live.open_count);
        }
    }

    if let Some(stats) = &snapshot.stats {
        let classes = |c: &crate::stats::ClassBytes| {
            [
                ("own", c.own),
                ("redirected", c.redirected),
                ("zero", c.zero),
                ("error", c.error),
                ("other", c.other),
            ]
        };
        let mut f = Family::new(
            &mut out,
            "vmar_device_read_bytes_total",
            "counter",
            "Bytes read from the device by class of extent: own (its image), redirected (a canonical copy), zero (no I/O).",
        );
        for d in &stats.devices {
            for (class, bytes) in classes(&d.read.by_class) {
                f.sample(&[("device", &d.name), ("class", class)], bytes);
            }
        }
        let mut f = Family::new(
            &mut out,
            "vmar_device_mapped_bytes",
            "gauge",
            "Bytes of the device each class of extent maps.",
        );
        for d in &stats.devices {
            for (class, bytes) in classes(&d.mapped) {
                f.sample(&[("device", &d.name), ("class", class)], bytes);
            }
        }
        let mut f = Family::new(
            &mut out,
            "vmar_device_cached_bytes",
            "gauge",
            "Bytes of the device whose backing pages are in the host page cache.",
        );
        for d in &stats.devices {
            f.sample(&[("device", &d.name)], d.cached);
        }
        let mut f = Family::new(
            &mut out,
            "vmar_device_targets",
            "gauge",
            "Device-mapper targets of the device's table by class.",
        );
        for d in &stats.devices {
            let t = &d.targets;
            for (class, n) in [
                ("own", t.own),
                ("redirected", t.redirected),
                ("zero", t.zero),
                ("error", t.error),
                ("other", t.other),
            ] {
                f.sample(&[("device", &d.name), ("class", class)], n);
            }
        }
        let mut f = Family::new(
            &mut out,
            "vmar_image_file_cached_bytes",
            "gauge",
            "Bytes of an image file that devices read in the host page cache.",
        );
        for i in &stats.images {
            f.sample(&[("file", &i.path), ("loop", &i.loop_device)], i.cached);
        }
        let mut f = Family::new(
            &mut out,
            "vmar_sharing_factor",
            "gauge",
            "Cached bytes all devices can read over cached bytes of the image files (1: no sharing).",
        );
        if let Some(factor) = stats.sharing_factor {
            f.sample(&[], factor);
        }
    }

    let mut f = Family::new(
        &mut out,
        "vmar_image_size_bytes",
        "gauge",
        "Size of a captured image.",
    );
    for i in &snapshot.images {
        f.sample(&[("image", &i.name)], i.size);
    }
    let mut f = Family::new(
        &mut out,
        "vmar_image_shared_bytes",
        "gauge",
        "Bytes of a captured image whose blocks are read from another image's canonical copy.",
    );
    for i in &snapshot.images {
        f.sample(&[("image", &i.name)], i.shared);
    }
    let mut f = Family::new(
        &mut out,
        "vmar_image_missing",
        "gauge",
        "Whether a captured image's file no longer exists.",
    );
    for i in &snapshot.images {
        f.sample(&[("image", &i.name)], flag(i.missing));
    }
    let mut f = Family::new(
        &mut out,
        "vmar_image_changed",
        "gauge",
        "Whether a captured image's file is no longer the version that was captured.",
    );
    for i in &snapshot.images {
        f.sample(&[("image", &i.name)], flag(i.changed));
    }

    Family::new(
        &mut out,
        "vmar_catalog_images",
        "gauge",
        "Images in the catalog.",
    )
    .sample(&[], snapshot.images.len());
    Family::new(
        &mut out,
        "vmar_catalog_bytes",
        "gauge",
        "Bytes of the catalog's files in the state directory.",
    )
    .sample(&[], snapshot.catalog_bytes);

    let restore = &snapshot.restore;
    Family::new(
        &mut out,
        "vmar_restore_success",
        "gauge",
        "Whether the restore at vmard's start restored every saved device (1 also when it did not run).",
    )
    .sample(&[], flag(restore.ok()));
    let mut f = Family::new(
        &mut out,
        "vmar_restore_timestamp_seconds",
        "gauge",
        "When the restore at vmard's start finished.",
    );
    if let Some(at) = restore.at {
        f.sample(&[], at);
    }
    let mut f = Family::new(
        &mut out,
        "vmar_restore_devices",
        "gauge",
        "Devices by what the restore at vmard's start did with them.",
    );
    if let Some(r) = &restore.report {
        for (outcome, n) in [
            ("created", r.created.len()),
            ("unchanged", r.unchanged.len()),
            ("repaired", r.repaired.len()),
            ("failed", r.failed.len()),
            ("rolled_back", r.rolled_back.len()),
            ("removed", r.removed.len()),
            ("cleaned", r.cleaned.len()),
        ] {
            f.sample(&[("outcome", outcome)], n);
        }
    }
    out
}

/// What a collector writes when vmard does not answer: `vmar_up 0`, so that an alert fires
/// instead of stale figures being scraped.
pub fn unreachable() -> String {
    let mut out = String::new();
    Family::new(&mut out, "vmar_up", "gauge", "Whether vmard answered (1).").sample(&[], 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::RestoreReport;

    fn device(name: &str, state: &str) -> DeviceStatus {
        DeviceStatus {
            name: name.into(),
            image: Some("base".into()),
            state: state.into(),
            changed_images: Vec::new(),
            reason: None,
            node: crate::kernel::node_path(name).display().to_string(),
            live: None,
            target_types: Default::default(),
            reads_from: Vec::new(),
            budget: None,
            table: None,
        }
    }

    #[test]
    fn every_state_is_a_label_and_values_are_escaped() {
        let snapshot = Snapshot {
            devices: vec![device("web", "active"), device("db", "some-new-state")],
            images: vec![ImageHealth {
                name: "we\"ird\\na\nme".into(),
                size: 4096,
                shared: 0,
                missing: true,
                changed: false,
            }],
            restore: RestoreStatus {
                ran: true,
                at: Some(7),
                report: Some(RestoreReport {
                    failed: vec![("db".into(), "gone".into())],
                    ..Default::default()
                }),
                error: None,
            },
            ..Default::default()
        };
        let text = render(&snapshot);
        assert!(
            text.contains(
                "vmar_device_state{device=\"db\",node=\"/dev/vmar/db\",image=\"base\",state=\"some-new-state\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("vmar_device_active{device=\"web\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vmar_device_active{device=\"db\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("vmar_image_missing{image=\"we\\\"ird\\\\na\\nme\"} 1"),
            "{text}"
        );
        assert!(text.contains("vmar_restore_success 0"), "{text}");
        assert!(
            text.contains("vmar_restore_devices{outcome=\"failed\"} 1"),
            "{text}"
        );
        assert!(text.contains("vmar_restore_timestamp_seconds 7"), "{text}");
        // Every sample line belongs to the family declared last.
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_string();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(&family), "{line} outside {family}");
            }
        }
    }

    #[test]
    fn an_unreachable_vmard_is_reported_as_down() {
        assert!(unreachable().contains("\nvmar_up 0\n"));
        assert!(render(&Snapshot::default()).contains("\nvmar_up 1\n"));
    }
}
