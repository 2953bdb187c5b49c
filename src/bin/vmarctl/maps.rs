//! An image's map: `map`, `table` (its device-mapper table) and `verify`.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Result, bail};
use clap::Args;
use indicatif::HumanBytes;
use vmar::error::ExitClass;
use vmar::name::ImageName;
use vmar::protocol::{MapResult, request};

use crate::context::{Ctx, Run};
use crate::output::Usage;

#[derive(Args, Debug)]
pub struct MapArgs {
    name: String,
    /// Also list every extent.
    #[arg(long)]
    extents: bool,
}

impl Run for MapArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let map = ctx.call(request::Map {
            name: ImageName::new(self.name.as_str())?,
            extents: self.extents,
        })?;
        ctx.show(out, &map, print_map)?;
        Ok(ExitClass::Success)
    }
}

fn print_map(out: &mut dyn Write, map: &MapResult) -> Result<()> {
    let s = &map.summary;
    writeln!(out, "image       {} ({})", map.name, HumanBytes(map.size))?;
    writeln!(out, "blocks      {} of 4 KiB", s.blocks)?;
    writeln!(out, "zero        {}", s.zero_blocks)?;
    writeln!(out, "own         {}", s.own_blocks)?;
    writeln!(
        out,
        "redirected  {} ({} to other images)",
        s.redirected_blocks, s.redirected_to_other_images
    )?;
    writeln!(out, "shared      {}", HumanBytes(s.bytes_shared))?;
    writeln!(out, "extents     {}", s.extents)?;
    let names: BTreeMap<_, _> = map.references.iter().map(|r| (r.id, &r.name)).collect();
    if !map.references.is_empty() {
        let list: Vec<&str> = map.references.iter().map(|r| r.name.as_str()).collect();
        writeln!(out, "reads from  {}", list.join(", "))?;
    }
    if let Some(extents) = &map.extents {
        writeln!(out, "\n{:>12} {:>10}  SOURCE", "START", "BLOCKS")?;
        for e in extents {
            let source = match e.source {
                vmar::map::Source::Zero => "zero".to_string(),
                vmar::map::Source::Own => "own".to_string(),
                vmar::map::Source::Redirect { image, block } => {
                    let name = names.get(&image).map_or(map.name.as_str(), |n| n.as_str());
                    format!("{name} block {block}")
                }
            };
            writeln!(out, "{:>12} {:>10}  {source}", e.start, e.len)?;
        }
    }
    Ok(())
}

// Arguments of `table` (not `crate::table::TableArgs`, the options of printed tables). A
// plain comment: clap would take a doc comment here for the subcommand's help.
#[derive(Args, Debug)]
pub struct DmTableArgs {
    name: String,
    /// Block device of an image, as IMAGE=DEVICE (repeatable); others get a
    /// `loop:IMAGE` placeholder.
    #[arg(long = "device", value_name = "IMAGE=DEVICE")]
    devices: Vec<String>,
}

impl Run for DmTableArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let name = &self.name;
        let devices = parse_devices(&self.devices)?;
        if !devices.is_empty() {
            // A --device for an image the table does not read would be silently ignored.
            let map = ctx.call(request::Map {
                name: ImageName::new(name)?,
                extents: false,
            })?;
            let mut read: Vec<&str> = vec![map.name.as_str()];
            read.extend(map.references.iter().map(|r| r.name.as_str()));
            for image in devices.keys() {
                if !read.contains(&image.as_str()) {
                    bail!(Usage(format!(
                        "--device {image}=...: the table of {name} does not read image {image:?}; it reads {}",
                        read.join(", ")
                    )));
                }
            }
        }
        let table = ctx.call(request::Table {
            name: ImageName::new(name)?,
            devices,
        })?;
        ctx.show(out, &table, |out, table| {
            write!(out, "{}", table.text)?;
            Ok(())
        })?;
        Ok(ExitClass::Success)
    }
}

fn parse_devices(specs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut devices = BTreeMap::new();
    for spec in specs {
        let Some((image, device)) = spec.split_once('=') else {
            bail!(Usage(format!(
                "--device {spec:?}: expected IMAGE=DEVICE, e.g. web=/dev/loop3"
            )));
        };
        devices.insert(image.to_string(), device.to_string());
    }
    Ok(devices)
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    name: String,
}

impl Run for VerifyArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let name = &self.name;
        let request = request::Verify {
            name: ImageName::new(name)?,
        };
        let report = ctx.call_with_progress(request, &format!("verify {name}"))?;
        ctx.show(out, &report, |out, report| {
            match &report.mismatch {
                Some(m) => writeln!(
                    out,
                    "{}: MISMATCH at block {} (byte {}), mapped to {:?}{}; re-capture the images it reads (vmarctl capture --recapture) and report it if it persists",
                    report.name,
                    m.block,
                    m.offset,
                    m.source,
                    m.source_image
                        .as_ref()
                        .map(|n| format!(" in image {n}"))
                        .unwrap_or_default()
                )?,
                None => writeln!(
                    out,
                    "{}: ok, {} blocks, {} compared through the map",
                    report.name,
                    report.blocks,
                    HumanBytes(report.bytes_compared)
                )?,
            }
            Ok(())
        })?;
        Ok(if report.ok {
            ExitClass::Success
        } else {
            ExitClass::CheckFailed
        })
    }
}
