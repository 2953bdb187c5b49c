//! The catalog's images: `images`, `forget`, `dependents`.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use vmar::error::ExitClass;
use vmar::name::ImageName;
use vmar::protocol::{ImageFileState, request};
use vmar::records::ImageRecord;

use crate::context::{Ctx, Run};
use crate::output::print_json;
use crate::table::{Cell, Column, Table, TableArgs, col};

#[derive(Args, Debug)]
pub struct ImagesArgs {
    #[command(flatten)]
    table: TableArgs,
}

const IMAGE_COLUMNS: &[Column] = &[
    col("id", true, true),
    col("name", false, true),
    col("size", true, true),
    col("zero", true, true),
    col("own", true, true),
    col("redirected", true, true),
    col("extents", true, true),
    col("path", false, true),
    col("file", false, true),
    col("kept_by", false, true),
    col("fingerprint", false, false),
    col("captured_at", true, false),
];

/// The `file` cell of `images`: `present`, or `gone` and whether vmar holds it.
fn file_cell(file: Option<&ImageFileState>) -> Cell {
    match file {
        None => Cell::None,
        Some(f) if f.state == "present" => Cell::Text(f.state.clone()),
        Some(f) if f.hold.is_some() => Cell::Text(format!("{} (held)", f.state)),
        Some(f) => Cell::Text(format!("{} (not held)", f.state)),
    }
}

/// The `kept_by` cell of `images`: the devices that read it and the images whose maps
/// redirect into it, e.g. `vm1,vm2 +images:web`.
fn kept_by_cell(file: Option<&ImageFileState>) -> Cell {
    let Some(kept) = file.map(|f| &f.kept_by) else {
        return Cell::None;
    };
    let mut parts = Vec::new();
    if !kept.devices.is_empty() {
        parts.push(kept.devices.join(","));
    }
    if !kept.images.is_empty() {
        parts.push(format!("+images:{}", kept.images.join(",")));
    }
    if parts.is_empty() {
        Cell::None
    } else {
        Cell::Text(parts.join(" "))
    }
}

impl Run for ImagesArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let args = &self.table;
        let list = ctx.images()?;
        if ctx.json {
            print_json(out, &list)?;
            return Ok(ExitClass::Success);
        }
        let rows = list
            .images
            .iter()
            .map(|image| {
                let s = &image.summary;
                vec![
                    Cell::Count(u64::from(image.id)),
                    Cell::Text(image.name.clone()),
                    Cell::Bytes(image.size),
                    Cell::Count(s.zero_blocks),
                    Cell::Count(s.own_blocks),
                    Cell::Count(s.redirected_blocks),
                    Cell::Count(s.extents),
                    Cell::Text(image.path.display().to_string()),
                    file_cell(image.file.as_ref()),
                    kept_by_cell(image.file.as_ref()),
                    image.fingerprint.clone().map_or(Cell::None, Cell::Text),
                    Cell::Count(image.captured_at),
                ]
            })
            .collect();
        Table {
            columns: IMAGE_COLUMNS,
            rows,
        }
        .print(args, out)?;
        // What auto-capture did goes to stderr, so that stdout stays one table for scripts.
        if let Some(auto) = &list.auto_capture
            && !args.noheadings
        {
            let mut err = std::io::stderr();
            for skipped in &auto.skipped {
                let _ = writeln!(
                    err,
                    "auto-capture skipped {}: {}",
                    skipped.path.display(),
                    skipped.reason
                );
            }
            for path in &auto.waiting {
                let _ = writeln!(err, "auto-capture waiting for {} to settle", path.display());
            }
        }
        Ok(ExitClass::Success)
    }
}

#[derive(Args, Debug)]
pub struct ForgetArgs {
    name: String,
}

/// Result of `forget` for `--json`: the record forgotten and the maps rebuilt.
#[derive(Serialize)]
struct Forgotten {
    #[serde(flatten)]
    record: ImageRecord,
    rebuilt: Vec<String>,
}

impl Run for ForgetArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let result = ctx.call(request::Forget {
            name: ImageName::new(self.name.as_str())?,
        })?;
        let forgotten = Forgotten {
            record: result.image,
            rebuilt: result.changed,
        };
        ctx.show(out, &forgotten, |out, f| {
            writeln!(
                out,
                "forgot {} ({})",
                f.record.name,
                f.record.path.display()
            )?;
            if f.rebuilt.is_empty() {
                writeln!(out, "no map changed (no image read from it)")?;
            } else {
                writeln!(out, "changed the maps of {}", f.rebuilt.join(", "))?;
            }
            Ok(())
        })?;
        Ok(ExitClass::Success)
    }
}

#[derive(Args, Debug)]
pub struct DependentsArgs {
    image: String,
}

const DEPENDENT_COLUMNS: &[Column] = &[
    col("kind", false, true),
    col("name", false, true),
    col("node", false, true),
    col("serves", false, true),
    col("blocks", true, true),
];

impl Run for DependentsArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let found = ctx.call(request::Dependents {
            name: ImageName::new(self.image.as_str())?,
        })?;
        if ctx.json {
            print_json(out, &found)?;
            return Ok(ExitClass::Success);
        }
        let mut rows: Vec<Vec<Cell>> = found
            .devices
            .iter()
            .map(|d| {
                vec![
                    Cell::Text("device".into()),
                    Cell::Text(d.name.clone()),
                    Cell::Text(d.node.clone()),
                    Cell::Text(d.serves.clone()),
                    Cell::None,
                ]
            })
            .collect();
        rows.extend(found.images.iter().map(|i| {
            vec![
                Cell::Text("image".into()),
                Cell::Text(i.name.clone()),
                Cell::None,
                Cell::None,
                Cell::Count(i.blocks),
            ]
        }));
        Table {
            columns: DEPENDENT_COLUMNS,
            rows,
        }
        .print(&TableArgs::default(), out)?;
        Ok(ExitClass::Success)
    }
}
