//! vmarctl: the command-line client of vmard.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde::Serialize;
use vmar::client::Client;
use vmar::protocol::{
    CaptureResult, DEFAULT_SOCKET, DeviceChange, DeviceStats, DeviceStatus, ImagesResult,
    MapResult, PingResult, Progress, Removed, Request, StatsReport, TableResult,
};
use vmar::records::{CaptureStatus, ImageRecord};
use vmar::verify::VerifyReport;

/// Control vmard: capture VM images, inspect their maps, create and manage their devices.
#[derive(Parser, Debug)]
#[command(name = "vmarctl", version)]
struct Cli {
    /// vmard's socket.
    #[arg(long, global = true, env = "VMAR_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,

    /// Print results as JSON (one document on stdout) instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check that vmard answers.
    Ping,
    /// Hash raw images into the catalog (read-only; a captured, unchanged image is skipped).
    Capture {
        /// Raw images: regular files or block devices.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Name of the image (only with one image; default: file name without extension).
        #[arg(long)]
        name: Option<String>,
        /// Capture again an image that changed since it was captured; maps of images
        /// captured after it are rebuilt.
        #[arg(long)]
        recapture: bool,
        /// Capture an image even though its first bytes look like a container format
        /// (qcow2, vmdk, vhdx, vdi, ...): for raw images that merely start that way.
        #[arg(long)]
        force_raw: bool,
    },
    /// List captured images in capture order.
    Images,
    /// Show an image's block translation map.
    Map {
        name: String,
        /// Also list every extent.
        #[arg(long)]
        extents: bool,
    },
    /// Print the device-mapper table of an image (512-byte sectors).
    Table {
        name: String,
        /// Block device of an image, as IMAGE=DEVICE (repeatable); others get a
        /// `loop:IMAGE` placeholder.
        #[arg(long = "device", value_name = "IMAGE=DEVICE")]
        devices: Vec<String>,
    },
    /// Read an image through its map and prove it equals the image.
    Verify { name: String },
    /// Remove an image from the catalog (maps of later images are rebuilt).
    Forget { name: String },
    /// Create read-only device /dev/mapper/vmar-NAME serving a captured image.
    Create {
        name: String,
        /// A captured image's name, or the path of an image file.
        image: String,
        /// Capture the image file first if it is not captured yet.
        #[arg(long)]
        capture: bool,
        /// With --capture: capture even if the image looks like a container format.
        #[arg(long)]
        force_raw: bool,
    },
    /// Remove a device; its loop devices go when no device uses them.
    Remove {
        name: String,
        /// Remove an open device when its last user closes it, as `dmsetup remove
        /// --deferred` (`--force` is an old name for this; unlike dmsetup's --force it never
        /// replaces the table of a device in use).
        #[arg(long, alias = "force")]
        deferred: bool,
    },
    /// List devices: saved, live, and their state.
    List,
    /// Show one device: image, state, targets, loop devices, budget cost.
    Status {
        name: String,
        /// Also print the live table as the kernel has it.
        #[arg(long)]
        table: bool,
    },
    /// Load the current map of a device's image into the live device, atomically.
    Refresh { name: String },
    /// Show what devices read, by redirected, own and zero extents; their target counts;
    /// and how much the page cache of the image files is shared.
    Stats {
        /// One device (default: all live devices).
        name: Option<String>,
    },
    /// Print a libvirt <disk> element for a device.
    LibvirtXml {
        name: String,
        /// Guest disk name.
        #[arg(long, default_value = "vda")]
        target: String,
        /// A qcow2 overlay file backed by the device (create it with
        /// `qemu-img create -f qcow2 -b /dev/vmar/NAME -F raw FILE`); without it the disk is
        /// the device itself, read-only.
        #[arg(long)]
        overlay: Option<PathBuf>,
    },
    /// Print shell completions for vmarctl.
    Completions { shell: clap_complete::Shell },
    /// Print vmarctl's man page (roff).
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            if cli.json {
                let kind = e
                    .downcast_ref::<vmar::Error>()
                    .map(|e| match e {
                        vmar::Error::Remote { kind, .. } => kind.clone(),
                        other => other.kind().to_string(),
                    })
                    .unwrap_or_else(|| "error".into());
                println!(
                    "{}",
                    serde_json::json!({"error": {"kind": kind, "message": format!("{e:#}")}})
                );
            }
            eprintln!("vmarctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A progress bar on stderr when it is a terminal and output is not JSON.
fn progress_bar(cli: &Cli, label: &str) -> ProgressBar {
    if cli.json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(label.to_string());
    bar
}

fn update(bar: &ProgressBar) -> impl FnMut(Progress) + '_ {
    |p| {
        bar.set_length(p.total);
        bar.set_position(p.done);
    }
}

fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `value` as JSON with `--json`, else as `text` words it.
fn show<T: Serialize>(cli: &Cli, value: &T, text: impl FnOnce(&T)) -> Result<()> {
    if cli.json {
        print_json(value)
    } else {
        text(value);
        Ok(())
    }
}

fn run(cli: &Cli) -> Result<ExitCode> {
    let client = Client::new(&cli.socket);
    match &cli.command {
        Command::Ping => {
            let pong: PingResult = client.call(&Request::Ping, &mut |_| {})?;
            show(cli, &pong, |pong| {
                println!(
                    "vmard {} (protocol {}) at {}, state in {}",
                    pong.version,
                    pong.protocol,
                    cli.socket.display(),
                    pong.state_dir.display()
                );
            })?;
        }
        Command::Capture {
            images,
            name,
            recapture,
            force_raw,
        } => {
            return capture(
                cli,
                &client,
                images,
                name.as_deref(),
                *recapture,
                *force_raw,
            );
        }
        Command::Images => {
            let list: ImagesResult = client.call(&Request::Images, &mut |_| {})?;
            show(cli, &list, |list| print_images(&list.images))?;
        }
        Command::Create {
            name,
            image,
            capture,
            force_raw,
        } => {
            let image = if image.contains('/') {
                std::path::absolute(image)
                    .with_context(|| format!("cannot resolve {image}"))?
                    .display()
                    .to_string()
            } else {
                image.clone()
            };
            let bar = progress_bar(cli, &image);
            let request = Request::Create {
                name: name.clone(),
                image,
                capture: *capture,
                force_raw: *force_raw,
            };
            let created: DeviceChange = client.call(&request, &mut update(&bar))?;
            bar.finish_and_clear();
            show(cli, &created, |created| print_change("created", created))?;
        }
        Command::Refresh { name } => {
            let request = Request::Refresh { name: name.clone() };
            let refreshed: DeviceChange = client.call(&request, &mut |_| {})?;
            show(cli, &refreshed, |refreshed| {
                print_change("refreshed", refreshed)
            })?;
        }
        Command::Remove { name, deferred } => {
            let request = Request::Remove {
                name: name.clone(),
                deferred: *deferred,
            };
            let removed: Removed = client.call(&request, &mut |_| {})?;
            if cli.json {
                print_json(&removed)?;
            } else if removed.deferred {
                println!("{name}: open; it will be removed when its last user closes it");
            } else {
                println!("removed {name}");
            }
        }
        Command::List => {
            let devices: Vec<DeviceStatus> = client.call(&Request::List, &mut |_| {})?;
            show(cli, &devices, |devices| print_devices(devices))?;
        }
        Command::LibvirtXml {
            name,
            target,
            overlay,
        } => {
            // The device must be one vmard knows.
            let request = Request::Status {
                name: name.clone(),
                table: false,
            };
            let _: DeviceStatus = client.call(&request, &mut |_| {})?;
            let overlay = overlay
                .as_deref()
                .map(std::path::absolute)
                .transpose()
                .context("cannot resolve the overlay path")?;
            let xml = vmar::libvirt::disk_xml(name, target, overlay.as_deref())?;
            if cli.json {
                print_json(&serde_json::json!({ "xml": xml }))?;
            } else {
                print!("{xml}");
            }
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "vmarctl", &mut std::io::stdout());
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
        }
        Command::Stats { name } => {
            let request = Request::Stats { name: name.clone() };
            let report: StatsReport = client.call(&request, &mut |_| {})?;
            show(cli, &report, print_stats)?;
        }
        Command::Status { name, table } => {
            let request = Request::Status {
                name: name.clone(),
                table: *table,
            };
            let status: DeviceStatus = client.call(&request, &mut |_| {})?;
            show(cli, &status, print_status)?;
        }
        Command::Map { name, extents } => {
            let request = Request::Map {
                name: name.clone(),
                extents: *extents,
            };
            let map: MapResult = client.call(&request, &mut |_| {})?;
            show(cli, &map, print_map)?;
        }
        Command::Table { name, devices } => {
            let devices = parse_devices(devices)?;
            let request = Request::Table {
                name: name.clone(),
                devices,
            };
            let table: TableResult = client.call(&request, &mut |_| {})?;
            show(cli, &table, |table| print!("{}", table.text))?;
        }
        Command::Verify { name } => {
            let bar = progress_bar(cli, name);
            let request = Request::Verify { name: name.clone() };
            let report: VerifyReport = client.call(&request, &mut update(&bar))?;
            bar.finish_and_clear();
            if cli.json {
                print_json(&report)?;
            } else if let Some(m) = &report.mismatch {
                println!(
                    "{}: MISMATCH at block {} (byte {}), mapped to {:?}{}",
                    report.name,
                    m.block,
                    m.offset,
                    m.source,
                    m.source_image
                        .as_ref()
                        .map(|n| format!(" in image {n}"))
                        .unwrap_or_default()
                );
            } else {
                println!(
                    "{}: ok, {} blocks, {} compared through the map",
                    report.name,
                    report.blocks,
                    HumanBytes(report.bytes_compared)
                );
            }
            if !report.ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Forget { name } => {
            let request = Request::Forget { name: name.clone() };
            let record: ImageRecord = client.call(&request, &mut |_| {})?;
            show(cli, &record, |record| {
                println!("forgot {} ({})", record.name, record.path.display())
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_devices(specs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut devices = BTreeMap::new();
    for spec in specs {
        let Some((image, device)) = spec.split_once('=') else {
            bail!("--device {spec:?}: expected IMAGE=DEVICE, e.g. web=/dev/loop3");
        };
        devices.insert(image.to_string(), device.to_string());
    }
    Ok(devices)
}

/// Per-image outcome of `capture`, for `--json`.
#[derive(Serialize)]
struct CaptureOutcome {
    path: PathBuf,
    #[serde(flatten)]
    outcome: CaptureEither,
}

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum CaptureEither {
    Result(CaptureResult),
    Error { kind: String, message: String },
}

fn capture(
    cli: &Cli,
    client: &Client,
    images: &[PathBuf],
    name: Option<&str>,
    recapture: bool,
    force_raw: bool,
) -> Result<ExitCode> {
    if name.is_some() && images.len() > 1 {
        bail!("--name applies to one image; capture the images one by one to name them");
    }
    let mut outcomes = Vec::new();
    let mut failed = false;
    for path in images {
        let absolute = std::path::absolute(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let bar = progress_bar(cli, &path.display().to_string());
        let request = Request::Capture {
            path: absolute,
            name: name.map(str::to_string),
            recapture,
            force_raw,
        };
        let outcome = client.call::<CaptureResult>(&request, &mut update(&bar));
        bar.finish_and_clear();
        let outcome = match outcome {
            Ok(result) => {
                if !cli.json {
                    print_capture(&result);
                }
                CaptureEither::Result(result)
            }
            Err(e @ vmar::Error::DaemonUnavailable { .. }) => return Err(e.into()),
            Err(e) => {
                failed = true;
                eprintln!("vmarctl: capture {}: {e}", path.display());
                let kind = match &e {
                    vmar::Error::Remote { kind, .. } => kind.clone(),
                    other => other.kind().to_string(),
                };
                CaptureEither::Error {
                    kind,
                    message: e.to_string(),
                }
            }
        };
        outcomes.push(CaptureOutcome {
            path: path.clone(),
            outcome,
        });
    }
    if cli.json {
        print_json(&outcomes)?;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_capture(result: &CaptureResult) {
    let image = &result.image;
    let verb = match result.status {
        CaptureStatus::Captured => "captured",
        CaptureStatus::Recaptured => "re-captured",
        CaptureStatus::Unchanged => "unchanged, already captured as",
    };
    let s = &image.summary;
    println!(
        "{verb} {} ({}): {} read in {:.2}s, {} blocks: {} zero, {} own, {} redirected ({} shared), {} extents",
        image.name,
        HumanBytes(image.size),
        HumanBytes(image.scan.bytes_read),
        result.seconds,
        s.blocks,
        s.zero_blocks,
        s.own_blocks,
        s.redirected_blocks,
        HumanBytes(s.bytes_shared),
        s.extents
    );
}

fn print_change(verb: &str, change: &DeviceChange) {
    let b = &change.budget;
    println!(
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
    );
    for (image, (device, attached)) in &change.loops {
        let how = if *attached { "attached" } else { "reused" };
        println!("  {image}: {device} ({how})");
    }
}

fn print_devices(devices: &[DeviceStatus]) {
    println!(
        "{:<20} {:<10} {:<20} {:>8} {:>5}  NODE",
        "NAME", "STATE", "IMAGE", "TARGETS", "OPEN"
    );
    for d in devices {
        let (targets, open) = match &d.live {
            Some(live) => (live.targets.to_string(), live.open_count.to_string()),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<20} {:<10} {:<20} {:>8} {:>5}  {}",
            d.name,
            d.state,
            d.image.as_deref().unwrap_or("-"),
            targets,
            open,
            d.node
        );
    }
}

fn print_status(d: &DeviceStatus) {
    println!("device      {} ({})", d.name, d.node);
    println!("state       {}", d.state);
    println!("image       {}", d.image.as_deref().unwrap_or("-"));
    if let Some(live) = &d.live {
        println!(
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
        );
        let types: Vec<String> = d
            .target_types
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        println!("targets     {} ({})", live.targets, types.join(", "));
        println!("reads from  {}", d.reads_from.join(" "));
    }
    if let Some(b) = &d.budget {
        println!(
            "budget      {} targets: map has {} extents, table {}; {} redirected and {} zero blocks given up",
            b.budget,
            b.extents_before,
            b.extents_after,
            b.redirected_blocks_dropped,
            b.zero_blocks_dropped
        );
    }
    if let Some(table) = &d.table {
        for t in table {
            println!("{t}");
        }
    }
}

fn print_stats(report: &StatsReport) {
    let share = |part: u64, whole: u64| {
        if whole == 0 {
            "-".to_string()
        } else {
            format!("{:.0}%", part as f64 * 100.0 / whole as f64)
        }
    };
    println!(
        "{:<16} {:>10} {:>10} {:>6} {:>6} {:>6} {:>10} {:>8}  TARGETS own/redirected/zero",
        "DEVICE", "MAPPED", "READ", "REDIR", "OWN", "ZERO", "CACHED", "ESTIM."
    );
    let row = |name: &str, d: &DeviceStats| {
        let r = &d.read;
        println!(
            "{:<16} {:>10} {:>10} {:>6} {:>6} {:>6} {:>10} {:>8}  {}/{}/{}",
            name,
            HumanBytes(d.mapped.total()).to_string(),
            HumanBytes(r.total).to_string(),
            share(r.by_class.redirected, r.total),
            share(r.by_class.own, r.total),
            share(r.by_class.zero, r.total),
            HumanBytes(d.cached).to_string(),
            share(r.estimated, r.total),
            d.targets.own,
            d.targets.redirected,
            d.targets.zero
        );
    };
    for d in &report.devices {
        row(&d.name, d);
    }
    if report.devices.len() > 1 {
        let total = DeviceStats {
            name: "total".into(),
            image: None,
            targets: report.targets,
            mapped: report.mapped,
            read: report.read,
            cached: report.devices.iter().map(|d| d.cached).sum(),
        };
        row("total", &total);
    }
    println!();
    println!("{:<40} {:>10} {:>10}  LOOP", "IMAGE FILE", "SIZE", "CACHED");
    for i in &report.images {
        println!(
            "{:<40} {:>10} {:>10}  {}",
            i.path,
            HumanBytes(i.size).to_string(),
            HumanBytes(i.cached).to_string(),
            i.loop_device
        );
    }
    match report.sharing_factor {
        Some(f) => println!(
            "sharing factor {f:.2}: each cached byte of the images serves {f:.2} devices' bytes"
        ),
        None => println!("sharing factor -: nothing of the images is cached"),
    }
}

fn print_images(images: &[ImageRecord]) {
    println!(
        "{:>4}  {:<20} {:>10} {:>10} {:>10} {:>10} {:>9}  PATH",
        "ID", "NAME", "SIZE", "ZERO", "OWN", "REDIRECTED", "EXTENTS"
    );
    for image in images {
        let s = &image.summary;
        println!(
            "{:>4}  {:<20} {:>10} {:>10} {:>10} {:>10} {:>9}  {}",
            image.id,
            image.name,
            HumanBytes(image.size).to_string(),
            s.zero_blocks,
            s.own_blocks,
            s.redirected_blocks,
            s.extents,
            image.path.display()
        );
    }
}

fn print_map(map: &MapResult) {
    let s = &map.summary;
    println!("image       {} ({})", map.name, HumanBytes(map.size));
    println!("blocks      {} of 4 KiB", s.blocks);
    println!("zero        {}", s.zero_blocks);
    println!("own         {}", s.own_blocks);
    println!(
        "redirected  {} ({} to other images)",
        s.redirected_blocks, s.redirected_to_other_images
    );
    println!("shared      {}", HumanBytes(s.bytes_shared));
    println!("extents     {}", s.extents);
    let name_of = |id| {
        map.references
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.name.clone())
            .unwrap_or_else(|| map.name.clone())
    };
    if !map.references.is_empty() {
        let names: Vec<String> = map.references.iter().map(|r| r.name.clone()).collect();
        println!("reads from  {}", names.join(", "));
    }
    if let Some(extents) = &map.extents {
        println!("\n{:>12} {:>10}  SOURCE", "START", "BLOCKS");
        for e in extents {
            let source = match e.source {
                vmar::map::Source::Zero => "zero".to_string(),
                vmar::map::Source::Own => "own".to_string(),
                vmar::map::Source::Redirect { image, block } => {
                    format!("{} block {block}", name_of(image))
                }
            };
            println!("{:>12} {:>10}  {source}", e.start, e.len);
        }
    }
}
