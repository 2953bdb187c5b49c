//! `fleet-status`, and the report of one host that `capture --manifest` writes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use vmar::error::ExitClass;
use vmar::name::ImageName;
use vmar::protocol::request;

use crate::context::{Ctx, Run};
use crate::output::print_json;

#[derive(Args, Debug)]
pub struct FleetStatusArgs {
    manifest: PathBuf,
}

/// This host's `name fingerprint map-fingerprint` of each of `names`.
pub fn lines(ctx: &Ctx, names: &[String]) -> Result<Vec<vmar::fleet::Line>> {
    let images = ctx.images()?.images;
    let by_id: BTreeMap<u32, Option<String>> = images
        .iter()
        .map(|i| (i.id, i.fingerprint.clone()))
        .collect();
    let mut lines = Vec::new();
    for name in names {
        let map = ctx.call(request::Map {
            name: ImageName::new(name.as_str())?,
            extents: true,
        })?;
        let record = images
            .iter()
            .find(|i| &i.name == name)
            .with_context(|| format!("image {name} vanished from the catalog"))?;
        let extents = map.extents.unwrap_or_default();
        let blocks = map.size.div_ceil(vmar::image::BLOCK_SIZE);
        lines.push(vmar::fleet::Line {
            name: name.clone(),
            fingerprint: record.fingerprint.clone().unwrap_or_else(|| "-".into()),
            map: vmar::fleet::map_fingerprint(blocks, &extents, &|id| {
                by_id.get(&id).cloned().flatten()
            }),
        });
    }
    Ok(lines)
}

/// `fleet-status`: the hosts' reports beside a manifest, compared.
impl Run for FleetStatusArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let dir = PathBuf::from(format!("{}.hosts", self.manifest.display()));
        let mut reports = BTreeMap::new();
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for entry in entries {
            let entry = entry?;
            let host = entry.file_name().to_string_lossy().into_owned();
            if host.starts_with('.') {
                continue;
            }
            let text = std::fs::read_to_string(entry.path())
                .with_context(|| format!("cannot read {}", entry.path().display()))?;
            let lines = vmar::fleet::parse_report(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", entry.path().display()))?;
            reports.insert(host, lines);
        }
        let status = vmar::fleet::compare(&reports);
        let differ = status.iter().filter(|s| !s.same).count();
        if ctx.json {
            print_json(
                out,
                &serde_json::json!({ "hosts": reports.keys().collect::<Vec<_>>(), "images": status, "differ": differ }),
            )?;
        } else {
            writeln!(
                out,
                "{} hosts: {}",
                reports.len(),
                reports.keys().cloned().collect::<Vec<_>>().join(", ")
            )?;
            for image in &status {
                if image.same {
                    writeln!(out, "same     {}", image.name)?;
                    continue;
                }
                let hosts: Vec<String> = image
                    .hosts
                    .iter()
                    .map(|(host, v)| match v {
                        None => format!("{host}=missing"),
                        Some((f, m)) => format!("{host}={}/{}", short(f), short(m)),
                    })
                    .collect();
                writeln!(out, "DIFFERS  {}: {}", image.name, hosts.join(" "))?;
            }
        }
        Ok(if differ > 0 || reports.is_empty() {
            ExitClass::CheckFailed
        } else {
            ExitClass::Success
        })
    }
}

/// The first hex digits of a `blake3:HEX` fingerprint (content/map), enough to tell apart.
fn short(fingerprint: &str) -> &str {
    let hex = fingerprint.strip_prefix("blake3:").unwrap_or(fingerprint);
    hex.get(..12).unwrap_or(hex)
}
