//! Boot working sets: `record`, `working-set`, `warm` (see `vmar::prefetch`).

use std::io::Write;

use anyhow::Result;
use clap::Args;
use indicatif::HumanBytes;
use vmar::error::ExitClass;
use vmar::name::{DeviceName, Name};
use vmar::protocol::{SetSummary, WarmReport, request};

use crate::context::{Ctx, Run, device_arg};

// Arguments of `record`; its help is the doc comment of its variant in main.rs.
#[derive(Args, Debug)]
pub struct RecordArgs {
    #[arg(value_parser = device_arg)]
    name: String,
    /// Phase label (a-z, 0-9, -, _): e.g. `boot`, then `app` once the application ran.
    #[arg(long, default_value = vmar::workset::DEFAULT_PHASE)]
    phase: String,
    /// Replace the phase's set instead of adding to it.
    #[arg(long)]
    replace: bool,
}

impl Run for RecordArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let result = ctx.call(request::Record {
            name: DeviceName::new(self.name.as_str())?,
            phase: Some(self.phase.clone()),
            replace: self.replace,
        })?;
        ctx.show(out, &result, |out, r| {
            writeln!(
                out,
                "{}: recorded {} of image {} (phase {}): read areas {}, not cached {}",
                r.device,
                HumanBytes(r.recorded_bytes),
                r.image,
                r.set.phase,
                HumanBytes(r.read_area_bytes),
                HumanBytes(r.uncached_bytes)
            )?;
            set_line(out, &r.set)
        })?;
        Ok(ExitClass::Success)
    }
}

// Arguments of `working-set`.
#[derive(Args, Debug)]
pub struct WorkingSetArgs {
    name: String,
    /// Also list each set's runs (first block, blocks).
    #[arg(long, conflicts_with = "forget")]
    extents: bool,
    /// Drop the sets instead (of --phase only, if given).
    #[arg(long)]
    forget: bool,
    #[arg(long, requires = "forget")]
    phase: Option<String>,
}

impl Run for WorkingSetArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let name = &self.name;
        if self.forget {
            let result = ctx.call(request::ForgetWorkingSet {
                name: Name::new(name.as_str())?,
                phase: self.phase.clone(),
            })?;
            ctx.show(out, &result, |out, r| {
                writeln!(out, "forgot {} working set(s) of {name}", r.forgotten)?;
                Ok(())
            })?;
            return Ok(ExitClass::Success);
        }
        let result = ctx.call(request::WorkingSet {
            name: Name::new(name.as_str())?,
            extents: self.extents,
        })?;
        ctx.show(out, &result, |out, result| {
            if result.sets.is_empty() {
                writeln!(out, "{}: no working set recorded", result.image)?;
            }
            for set in &result.sets {
                write!(out, "{}: ", result.image)?;
                set_line(out, set)?;
                for [start, len] in set.extents.iter().flatten() {
                    writeln!(out, "  {start} +{len}")?;
                }
            }
            Ok(())
        })?;
        Ok(ExitClass::Success)
    }
}

// Arguments of `warm`.
#[derive(Args, Debug)]
pub struct WarmArgs {
    #[arg(required_unless_present = "cancel", conflicts_with = "cancel")]
    names: Vec<String>,
    /// Only the sets of this phase [default: all].
    #[arg(long)]
    phase: Option<String>,
    #[arg(long)]
    cancel: bool,
}

impl Run for WarmArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let report = ctx.call_with_progress(
            request::Warm {
                names: self
                    .names
                    .iter()
                    .map(|name| Name::new(name.as_str()))
                    .collect::<vmar::Result<_>>()?,
                phase: self.phase.clone(),
                cancel: self.cancel,
            },
            "warm",
        )?;
        ctx.show(out, &report, |out, r| warm_text(out, r, self.cancel))?;
        Ok(ExitClass::Success)
    }
}

fn set_line(out: &mut dyn Write, set: &SetSummary) -> Result<()> {
    writeln!(
        out,
        "phase {}: {} in {} runs, {} recording(s), last at {}",
        set.phase,
        HumanBytes(set.bytes),
        set.runs,
        set.recordings,
        set.updated
    )?;
    Ok(())
}

fn warm_text(out: &mut dyn Write, r: &WarmReport, cancel: bool) -> Result<()> {
    if cancel {
        writeln!(out, "stopped {} warm(s)", r.stopped)?;
        return Ok(());
    }
    for image in &r.images {
        if image.phases.is_empty() {
            writeln!(
                out,
                "{}: image {} has no working set (vmarctl record)",
                image.name, image.image
            )?;
        } else {
            writeln!(
                out,
                "{}: image {}, phases {}: {} ({} to read)",
                image.name,
                image.image,
                image.phases.join(","),
                HumanBytes(image.bytes),
                HumanBytes(image.canonical_bytes)
            )?;
        }
    }
    writeln!(
        out,
        "union {} (shared {}), cached {}; read {} in {} requests ({} of gaps), {} reads, {:.3} s{}",
        HumanBytes(r.union_bytes),
        HumanBytes(r.shared_bytes),
        HumanBytes(r.cached_bytes),
        HumanBytes(r.read_bytes),
        r.requests,
        HumanBytes(r.gap_bytes),
        r.reads,
        r.seconds,
        if r.cancelled { ", cancelled" } else { "" }
    )?;
    for e in &r.errors {
        writeln!(out, "error: {e}")?;
    }
    Ok(())
}
