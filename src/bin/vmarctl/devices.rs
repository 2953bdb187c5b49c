//! Devices: `create`, `ensure`, `remove`, `list`, `status`, `refresh`, `bindings`.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use vmar::error::ExitClass;
use vmar::name::DeviceName;
use vmar::protocol::request::{self, DeviceOptions};
use vmar::protocol::{DeviceChange, DeviceStatus};

use crate::context::{Ctx, Run, device_arg};
use crate::output::print_json;
use crate::table::{Cell, Column, Table, TableArgs, col};

/// An image argument as vmard takes it: a name, or an absolute path.
fn image_reference(image: &str) -> Result<String> {
    Ok(if image.contains('/') {
        std::path::absolute(image)
            .with_context(|| format!("cannot resolve {image}"))?
            .display()
            .to_string()
    } else {
        image.to_string()
    })
}

// `--capture` and `--force-raw` of create and ensure.
#[derive(Args, Debug)]
struct CaptureFirst {
    /// Capture the image file first if it is not captured yet.
    #[arg(long)]
    capture: bool,
    /// With --capture: capture even if the image looks like a container format.
    #[arg(long)]
    force_raw: bool,
}

impl CaptureFirst {
    fn with(&self, rebind: bool) -> DeviceOptions {
        DeviceOptions {
            capture: self.capture,
            force_raw: self.force_raw,
            rebind,
        }
    }
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[arg(value_parser = device_arg)]
    name: String,
    /// A captured image's name, or the path of an image file.
    image: String,
    #[command(flatten)]
    first: CaptureFirst,
    /// Serve other content than the name served before. A name remembers the image
    /// (fingerprint) it served, also after `remove`, because overlays and domains that
    /// name /dev/vmar/NAME would read the new bytes as theirs: re-bind only once nothing
    /// backs onto it.
    #[arg(long)]
    rebind: bool,
}

impl Run for CreateArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let name = &self.name;
        if self.first.capture {
            crate::capture::on_interrupt_of_capture();
        }
        let request = request::Create {
            name: DeviceName::new(name)?,
            image: image_reference(&self.image)?,
            options: self.options(),
        };
        let created = ctx.call_with_progress(request, &format!("create {name}"))?;
        ctx.show(out, &created, |out, c| print_change(out, "created", c))?;
        Ok(ExitClass::Success)
    }
}

impl CreateArgs {
    fn options(&self) -> DeviceOptions {
        self.first.with(self.rebind)
    }
}

#[derive(Args, Debug)]
pub struct EnsureArgs {
    name: String,
    /// A captured image's name, or the path of an image file.
    image: Option<String>,
    #[command(flatten)]
    first: CaptureFirst,
    /// Serve other content than the name served before (see `create --rebind`); never
    /// replaces a live device.
    #[arg(long)]
    rebind: bool,
}

impl Run for EnsureArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let name = &self.name;
        let request = request::Ensure {
            name: DeviceName::new(name)?,
            image: self.image.as_deref().map(image_reference).transpose()?,
            options: self.options(),
        };
        let ensured = ctx.call_with_progress(request, &format!("ensure {name}"))?;
        ctx.show(out, &ensured, |out, e| {
            let done = if e.created {
                "created"
            } else {
                "already serves"
            };
            writeln!(
                out,
                "{} ({}): {done} {} ({})",
                e.device.name,
                e.device.node,
                e.image,
                e.fingerprint.as_deref().unwrap_or("no fingerprint")
            )?;
            Ok(())
        })?;
        Ok(ExitClass::Success)
    }
}

impl EnsureArgs {
    fn options(&self) -> DeviceOptions {
        self.first.with(self.rebind)
    }
}

#[derive(Args, Debug)]
pub struct RemoveArgs {
    /// NAME, /dev/vmar/NAME or /dev/mapper/vmar-NAME.
    #[arg(value_parser = device_arg)]
    name: String,
    /// Remove an open device when its last user closes it, as `dmsetup remove
    /// --deferred`; until then `list` shows it as `removing`. (`--force` is an old name
    /// for this; unlike dmsetup's --force it never replaces the table of a device in use.)
    #[arg(long, alias = "force")]
    deferred: bool,
}

impl Run for RemoveArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let name = &self.name;
        let removed = ctx.call(request::Remove {
            name: DeviceName::new(name)?,
            deferred: self.deferred,
        })?;
        ctx.show(out, &removed, |out, removed| {
            if removed.deferred {
                writeln!(
                    out,
                    "{name}: open; removal deferred to its last close (`vmarctl list` shows it as removing)"
                )?;
            } else {
                writeln!(out, "removed {name}")?;
            }
            Ok(())
        })?;
        Ok(ExitClass::Success)
    }
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    table: TableArgs,
}

const DEVICE_COLUMNS: &[Column] = &[
    col("name", false, true),
    col("state", false, true),
    col("image", false, true),
    col("targets", true, true),
    col("open", true, true),
    col("node", false, true),
    col("dm_name", false, false),
    col("major_minor", false, false),
    col("reason", false, false),
];

impl Run for ListArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let devices = ctx.call(request::List)?;
        if ctx.json {
            print_json(out, &serde_json::json!({ "devices": devices }))?;
            return Ok(ExitClass::Success);
        }
        let rows = devices
            .iter()
            .map(|d| {
                let live = d.live.as_ref();
                vec![
                    Cell::Text(d.name.clone()),
                    Cell::Text(d.state.clone()),
                    d.image.clone().map_or(Cell::None, Cell::Text),
                    live.map_or(Cell::None, |l| Cell::Count(l.targets)),
                    live.map_or(Cell::None, |l| Cell::Text(l.open_count.to_string())),
                    Cell::Text(d.node.clone()),
                    live.map_or(Cell::None, |l| Cell::Text(l.dm_name.clone())),
                    live.map_or(Cell::None, |l| {
                        Cell::Text(format!("{}:{}", l.major, l.minor))
                    }),
                    d.reason.clone().map_or(Cell::None, Cell::Text),
                ]
            })
            .collect();
        Table {
            columns: DEVICE_COLUMNS,
            rows,
        }
        .print(&self.table, out)?;
        Ok(ExitClass::Success)
    }
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// NAME, /dev/vmar/NAME or /dev/mapper/vmar-NAME.
    #[arg(value_parser = device_arg)]
    name: String,
    /// Also print the live table as the kernel has it.
    #[arg(long)]
    table: bool,
}

/// `status` with the fingerprint of the device's image.
#[derive(Serialize)]
struct StatusDoc {
    #[serde(flatten)]
    status: DeviceStatus,
    /// Content fingerprint of the image the device serves (see `images`).
    fingerprint: Option<String>,
}

impl Run for StatusArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let status = ctx.call(request::Status {
            name: DeviceName::new(self.name.as_str())?,
            table: self.table,
        })?;
        let fingerprint = match &status.image {
            Some(image) => ctx
                .images()?
                .images
                .into_iter()
                .find(|i| &i.name == image)
                .and_then(|i| i.record.fingerprint),
            None => None,
        };
        let doc = StatusDoc {
            status,
            fingerprint,
        };
        ctx.show(out, &doc, print_status)?;
        Ok(ExitClass::Success)
    }
}

#[derive(Args, Debug)]
pub struct RefreshArgs {
    /// NAME, /dev/vmar/NAME or /dev/mapper/vmar-NAME.
    #[arg(value_parser = device_arg)]
    name: String,
}

impl Run for RefreshArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let refreshed = ctx.call(request::Refresh {
            name: DeviceName::new(self.name.as_str())?,
        })?;
        ctx.show(out, &refreshed, |out, c| print_change(out, "refreshed", c))?;
        Ok(ExitClass::Success)
    }
}

fn print_change(out: &mut dyn Write, verb: &str, change: &DeviceChange) -> Result<()> {
    let b = &change.budget;
    writeln!(
        out,
        "{verb} {} ({}): {} targets in {:.2}s{}",
        change.device.name,
        change.device.node,
        change.targets,
        change.seconds,
        if b.extents_before > b.extents_after {
            format!(
                "; target budget {} dropped {} redirected and {} zero blocks",
                b.budget, b.redirected_blocks_dropped, b.zero_blocks_dropped
            )
        } else {
            String::new()
        }
    )?;
    for (image, (device, attached)) in &change.loops {
        let how = if *attached { "attached" } else { "reused" };
        writeln!(out, "  {image}: {device} ({how})")?;
    }
    Ok(())
}

fn print_status(out: &mut dyn Write, doc: &StatusDoc) -> Result<()> {
    let d = &doc.status;
    writeln!(out, "device      {} ({})", d.name, d.node)?;
    let state = if d.state == "removing" {
        "removing (waits for its last user to close it)"
    } else {
        d.state.as_str()
    };
    writeln!(out, "state       {state}")?;
    if !d.changed_images.is_empty() {
        writeln!(
            out,
            "changed     {} (changed since capture; see vmard's log for what and the policy)",
            d.changed_images.join(", ")
        )?;
    }
    if let Some(reason) = &d.reason {
        writeln!(out, "reason      {reason}")?;
    }
    writeln!(out, "image       {}", d.image.as_deref().unwrap_or("-"))?;
    writeln!(
        out,
        "fingerprint {}",
        doc.fingerprint.as_deref().unwrap_or("-")
    )?;
    if let Some(live) = &d.live {
        writeln!(
            out,
            "kernel      {} {}:{}, {}, {} open",
            live.dm_name,
            live.major,
            live.minor,
            if live.read_only {
                "read-only"
            } else {
                "WRITABLE"
            },
            live.open_count
        )?;
        let types: Vec<String> = d
            .target_types
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        writeln!(out, "targets     {} ({})", live.targets, types.join(", "))?;
        writeln!(out, "reads from  {}", d.reads_from.join(" "))?;
    }
    if let Some(b) = &d.budget {
        writeln!(
            out,
            "budget      {} targets: map has {} extents, table {}; {} redirected and {} zero blocks given up",
            b.budget,
            b.extents_before,
            b.extents_after,
            b.redirected_blocks_dropped,
            b.zero_blocks_dropped
        )?;
    }
    if let Some(table) = &d.table {
        for t in table {
            writeln!(out, "{t}")?;
        }
    }
    Ok(())
}

const BINDING_COLUMNS: &[Column] = &[
    col("name", false, true),
    col("image", false, true),
    col("device", false, true),
    col("servable", false, true),
    col("fingerprint", false, true),
];

/// `bindings`: the content each device name is bound to.
pub fn bindings(ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
    let found = ctx.call(request::Bindings)?;
    if ctx.json {
        print_json(out, &found)?;
        return Ok(ExitClass::Success);
    }
    let yes_no = |b: bool| Cell::Text(if b { "yes" } else { "no" }.into());
    let rows = found
        .bindings
        .iter()
        .map(|b| {
            vec![
                Cell::Text(b.name.clone()),
                Cell::Text(b.image.clone()),
                yes_no(b.device),
                yes_no(b.servable),
                b.fingerprint.clone().map_or(Cell::None, Cell::Text),
            ]
        })
        .collect();
    Table {
        columns: BINDING_COLUMNS,
        rows,
    }
    .print(&TableArgs::default(), out)?;
    Ok(ExitClass::Success)
}
