//! `stats`: what devices read by class of extent, and the page cache of the image files.

use std::io::Write;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use vmar::error::ExitClass;
use vmar::name::DeviceName;
use vmar::protocol::{DeviceStats, StatsReport, request};

use crate::context::{Ctx, Run, device_arg};
use crate::output::{Usage, document, print_json};
use crate::table::{Cell, Column, Table, TableArgs, col};

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// One device (default: all live devices): NAME, /dev/vmar/NAME or
    /// /dev/mapper/vmar-NAME.
    #[arg(value_parser = device_arg)]
    name: Option<String>,
    /// Report again every SECONDS, each time what was read during the interval (the
    /// first report: since the devices were created), as `iostat` does.
    #[arg(long, value_name = "SECONDS")]
    interval: Option<f64>,
    /// With --interval: stop after N reports (default: until interrupted).
    #[arg(long, value_name = "N", requires = "interval")]
    count: Option<u64>,
    #[command(flatten)]
    table: TableArgs,
}

impl Run for StatsArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        stats(
            ctx,
            out,
            self.name.as_deref(),
            &self.table,
            self.interval,
            self.count,
        )?;
        Ok(ExitClass::Success)
    }
}

fn stats(
    ctx: &Ctx,
    out: &mut dyn Write,
    name: Option<&str>,
    args: &TableArgs,
    interval: Option<f64>,
    count: Option<u64>,
) -> Result<()> {
    let request = request::Stats {
        name: name.map(DeviceName::new).transpose()?,
    };
    let tables = stats_tables(args)?;
    let Some(interval) = interval else {
        let report = ctx.call(request.clone())?;
        if ctx.json {
            return print_json(out, &report);
        }
        return print_stats(out, &report, args, tables);
    };
    let pause = Duration::try_from_secs_f64(interval)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            Usage(format!(
                "--interval {interval}: give a positive number of seconds"
            ))
        })?;
    let mut previous: Option<StatsReport> = None;
    let mut printed = 0;
    loop {
        let report = ctx.call(request.clone())?;
        let shown = match &previous {
            Some(before) => stats_delta(before, &report),
            None => report.clone(),
        };
        if ctx.json {
            // One document a line (JSON Lines), so that a reader can follow the stream.
            writeln!(out, "{}", serde_json::to_string(&document(&shown)?)?)?;
        } else {
            if printed > 0 {
                writeln!(out)?;
            }
            print_stats(out, &shown, args, tables)?;
        }
        out.flush()?;
        printed += 1;
        if count.is_some_and(|n| printed >= n) {
            return Ok(());
        }
        previous = Some(report);
        std::thread::sleep(pause);
    }
}

/// `after` with the bytes read since `before`: per device (matched by name; a device new
/// since then shows all it read) and in the sums.
fn stats_delta(before: &StatsReport, after: &StatsReport) -> StatsReport {
    let minus = |a: &vmar::stats::ReadBytes, b: Option<&vmar::stats::ReadBytes>| {
        let Some(b) = b else { return *a };
        vmar::stats::ReadBytes {
            total: a.total.saturating_sub(b.total),
            by_class: vmar::stats::ClassBytes {
                own: a.by_class.own.saturating_sub(b.by_class.own),
                redirected: a.by_class.redirected.saturating_sub(b.by_class.redirected),
                zero: a.by_class.zero.saturating_sub(b.by_class.zero),
                error: a.by_class.error.saturating_sub(b.by_class.error),
                other: a.by_class.other.saturating_sub(b.by_class.other),
            },
            estimated: a.estimated.saturating_sub(b.estimated),
        }
    };
    let mut delta = after.clone();
    delta.read = vmar::stats::ReadBytes::default();
    for device in &mut delta.devices {
        let old = before.devices.iter().find(|d| d.name == device.name);
        device.read = minus(&device.read, old.map(|d| &d.read));
        delta.read.accumulate(&device.read);
    }
    delta
}

/// Which of stats' two tables to print: both without -o, else the one whose fields -o
/// names (fields of both: a usage error, since one output must be one table).
fn stats_tables(args: &TableArgs) -> Result<(bool, bool)> {
    let fields: Vec<&str> = args
        .fields
        .iter()
        .map(|f| f.trim_start_matches('+'))
        .filter(|f| !f.is_empty())
        .collect();
    if fields.is_empty() {
        return Ok((true, true));
    }
    let of = |columns: &[Column]| fields.iter().all(|f| columns.iter().any(|c| c.field == *f));
    match (of(STATS_COLUMNS), of(CACHE_COLUMNS)) {
        (true, _) => Ok((true, false)),
        (false, true) => Ok((false, true)),
        (false, false) => {
            let known = |columns: &[Column]| {
                columns
                    .iter()
                    .map(|c| c.field)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            bail!(Usage(format!(
                "-o {}: fields of one table, either devices ({}) or image files ({})",
                args.fields.join(","),
                known(STATS_COLUMNS),
                known(CACHE_COLUMNS)
            )))
        }
    }
}

const STATS_COLUMNS: &[Column] = &[
    col("device", false, true),
    col("mapped", true, true),
    col("read", true, true),
    col("redir", true, true),
    col("own", true, true),
    col("zero", true, true),
    col("cached", true, true),
    col("estim", true, true),
    col("targets", false, true),
];

const CACHE_COLUMNS: &[Column] = &[
    col("image_file", false, true),
    col("size", true, true),
    col("cached", true, true),
    col("loop", false, true),
];

fn print_stats(
    out: &mut dyn Write,
    report: &StatsReport,
    args: &TableArgs,
    (devices, files): (bool, bool),
) -> Result<()> {
    let share = |part: u64, whole: u64| {
        if whole == 0 {
            Cell::None
        } else {
            Cell::Text(format!("{:.0}%", part as f64 * 100.0 / whole as f64))
        }
    };
    let row = |name: &str, d: &DeviceStats| {
        let r = &d.read;
        vec![
            Cell::Text(name.to_string()),
            Cell::Bytes(d.mapped.total()),
            Cell::Bytes(r.total),
            share(r.by_class.redirected, r.total),
            share(r.by_class.own, r.total),
            share(r.by_class.zero, r.total),
            Cell::Bytes(d.cached),
            share(r.estimated, r.total),
            Cell::Text({
                let t = &d.targets;
                let mut text = format!("{}/{}/{}", t.own, t.redirected, t.zero);
                // Failed-closed and foreign extents are never shown as zeros.
                if t.error + t.other > 0 {
                    text.push_str(&format!(" +{} error +{} other", t.error, t.other));
                }
                text
            }),
        ]
    };
    let mut rows: Vec<Vec<Cell>> = report.devices.iter().map(|d| row(&d.name, d)).collect();
    if report.devices.len() > 1 {
        let total = DeviceStats {
            name: "total".into(),
            image: None,
            targets: report.targets,
            mapped: report.mapped,
            read: report.read,
            cached: report.devices.iter().map(|d| d.cached).sum(),
        };
        rows.push(row("total", &total));
    }
    if devices {
        Table {
            columns: STATS_COLUMNS,
            rows,
        }
        .print(args, out)?;
    }
    if devices && files && !args.noheadings {
        writeln!(out, "(targets: own/redirected/zero)")?;
        writeln!(out)?;
    }
    if !files {
        return Ok(());
    }
    let rows = report
        .images
        .iter()
        .map(|i| {
            vec![
                Cell::Text(i.path.clone()),
                Cell::Bytes(i.size),
                Cell::Bytes(i.cached),
                Cell::Text(i.loop_device.clone()),
            ]
        })
        .collect();
    // Without -o both tables print their default columns.
    let file_args = TableArgs {
        fields: if devices {
            Vec::new()
        } else {
            args.fields.clone()
        },
        ..args.clone()
    };
    Table {
        columns: CACHE_COLUMNS,
        rows,
    }
    .print(&file_args, out)?;
    if devices && !args.noheadings {
        match report.sharing_factor {
            Some(f) => writeln!(
                out,
                "sharing factor {f:.2}: each cached byte of the images serves {f:.2} devices' bytes"
            )?,
            None => writeln!(out, "sharing factor -: nothing of the images is cached")?,
        }
    }
    Ok(())
}
