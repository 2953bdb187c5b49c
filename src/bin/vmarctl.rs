//! vmarctl: the command-line client of vmard.

#[path = "vmarctl/man.rs"]
mod man;
#[path = "vmarctl/table.rs"]
mod table;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;
use vmar::client::Client;
use vmar::error::ExitClass;
use vmar::protocol::{
    CaptureResult, CheckReport, DEFAULT_SOCKET, DeviceChange, DeviceStats, DeviceStatus,
    ForgetResult, ImagesResult, MapResult, PingResult, Progress, Removed, Request, Severity,
    StatsReport, TableResult,
};
use vmar::records::{CaptureStatus, ImageRecord};
use vmar::verify::VerifyReport;

use table::{Cell, Column, Table, TableArgs, col};

/// Version of the JSON documents vmarctl prints (`"version"` of each; see docs/json.md).
const JSON_VERSION: u32 = 1;

/// Control vmard: capture VM images, inspect their maps, create and manage their devices.
///
/// vmarctl talks to vmard over its socket. Every command prints text, or with --json one
/// JSON object with a "version" (failures: {"version":1,"error":{"kind":..,"message":..}}).
/// The exit status tells the class of a failure (see EXIT STATUS).
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
        /// Capture again an image that changed since it was captured: the new version is
        /// captured after every other image, and maps that read from the old one change.
        #[arg(long)]
        recapture: bool,
        /// Capture an image even though its first bytes look like a container format
        /// (qcow2, vmdk, vhdx, vdi, ...): for raw images that merely start that way.
        #[arg(long)]
        force_raw: bool,
    },
    /// List captured images in capture order, with their content fingerprints, and what
    /// auto-capture did.
    Images {
        #[command(flatten)]
        table: TableArgs,
    },
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
    /// Remove a device; its loop devices go when no device uses them. An open device is
    /// refused unless --deferred.
    Remove {
        name: String,
        /// Remove an open device when its last user closes it, as `dmsetup remove
        /// --deferred`; until then `list` shows it as `removing`. (`--force` is an old name
        /// for this; unlike dmsetup's --force it never replaces the table of a device in use.)
        #[arg(long, alias = "force")]
        deferred: bool,
    },
    /// List devices: saved, live, and their state (`removing`: waiting for its last user
    /// to close it).
    List {
        #[command(flatten)]
        table: TableArgs,
    },
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
        #[command(flatten)]
        table: TableArgs,
    },
    /// Monitoring check (Nagios plugin): whether every saved device is active and correct
    /// (live, resumed, the table its image's map gives, images unchanged since capture) and
    /// every image root can be used. Prints a summary line, then one line per problem; exits
    /// 0 OK, 1 WARNING (a change in progress, a missing image root), 2 CRITICAL (a device not
    /// served as it should be), 3 UNKNOWN (vmard cannot be asked) instead of the classes of
    /// EXIT STATUS.
    Check,
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
    /// Print shell completions for vmarctl; bash and fish complete image and device names
    /// by asking vmard.
    Completions { shell: clap_complete::Shell },
    /// Print vmarctl's man page (roff), or write it and a page per subcommand
    /// (vmarctl-COMMAND.1) into a directory.
    Man {
        /// Write vmarctl.1 and vmarctl-COMMAND.1 into DIR and print their paths.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Names of images or devices, one a line, for shell completion (nothing on error).
    #[command(name = "__complete", hide = true)]
    Complete { what: Names },
}

/// What `__complete` lists.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Names {
    Images,
    Devices,
}

/// A usage error found after parsing (exit status 2, kind `usage`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

fn main() -> ExitCode {
    let json = std::env::args().skip(1).any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if !e.use_stderr() {
                // --help, --version.
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if json {
                print_error_json("usage", e.render().to_string().trim());
            }
            let _ = e.print();
            return ExitCode::from(ExitClass::Usage.code());
        }
    };
    if let Command::Check = cli.command {
        return check(&cli);
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = run(&cli, &mut out).and_then(|class| {
        out.flush()?;
        Ok(class)
    });
    match result {
        Ok(class) => ExitCode::from(class.code()),
        // A reader that went away (`| head`) wants no more: end quietly.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let (kind, class) = classify(&e);
            if cli.json {
                // What was printed before the failure is dropped: one document on stdout.
                drop(out);
                print_error_json(&kind, &format!("{e:#}"));
            }
            let _ = writeln!(std::io::stderr(), "vmarctl: {e:#}");
            ExitCode::from(class.code())
        }
    }
}

/// Whether `e` comes from writing to a closed pipe.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error kind and exit class of a failure.
fn classify(e: &anyhow::Error) -> (String, ExitClass) {
    if let Some(e) = e.downcast_ref::<vmar::Error>() {
        return (kind_of(e), e.exit_class());
    }
    if e.downcast_ref::<Usage>().is_some() {
        return ("usage".into(), ExitClass::Usage);
    }
    ("error".into(), ExitClass::Failed)
}

fn kind_of(e: &vmar::Error) -> String {
    match e {
        vmar::Error::Remote { kind, .. } => kind.clone(),
        other => other.kind().to_string(),
    }
}

fn print_error_json(kind: &str, message: &str) {
    let doc = serde_json::json!({
        "version": JSON_VERSION,
        "error": {"kind": kind, "message": message},
    });
    let _ = writeln!(std::io::stdout(), "{doc:#}");
}

/// Progress of a long operation on stderr: a bar on a terminal, else (logs, CI, systemd
/// units) a line after 2 s and then every 10 s, so that a slow capture is not silent.
enum Reporter {
    Bar(ProgressBar),
    Lines {
        label: String,
        started: Instant,
        next: Duration,
        printed: bool,
    },
}

impl Reporter {
    fn new(cli: &Cli, label: &str) -> Reporter {
        if std::io::stderr().is_terminal() && !cli.json {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            return Reporter::Bar(bar);
        }
        Reporter::Lines {
            label: label.to_string(),
            started: Instant::now(),
            next: Duration::from_secs(2),
            printed: false,
        }
    }

    fn update(&mut self, p: Progress) {
        match self {
            Reporter::Bar(bar) => {
                bar.set_length(p.total);
                bar.set_position(p.done);
            }
            Reporter::Lines {
                label,
                started,
                next,
                printed,
            } => {
                let elapsed = started.elapsed();
                if elapsed < *next {
                    return;
                }
                *next = elapsed + Duration::from_secs(10);
                *printed = true;
                let percent = if p.total == 0 {
                    100.0
                } else {
                    p.done as f64 * 100.0 / p.total as f64
                };
                let _ = writeln!(
                    std::io::stderr(),
                    "vmarctl: {label}: {} of {} ({percent:.0}%) in {:.0}s",
                    HumanBytes(p.done),
                    HumanBytes(p.total),
                    elapsed.as_secs_f64()
                );
            }
        }
    }

    fn finish(self) {
        match self {
            Reporter::Bar(bar) => bar.finish_and_clear(),
            Reporter::Lines {
                label,
                started,
                printed: true,
                ..
            } => {
                let _ = writeln!(
                    std::io::stderr(),
                    "vmarctl: {label}: done in {:.1}s",
                    started.elapsed().as_secs_f64()
                );
            }
            Reporter::Lines { .. } => {}
        }
    }
}

/// `value` (a JSON object) with `"version"` added: the document one command prints.
fn document(value: &impl Serialize) -> Result<Value> {
    let mut value = serde_json::to_value(value)?;
    match value.as_object_mut() {
        Some(map) => {
            map.insert("version".into(), JSON_VERSION.into());
        }
        None => bail!("internal: JSON result is not an object"),
    }
    Ok(value)
}

fn print_json(out: &mut dyn Write, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(&document(value)?)?;
    writeln!(out, "{text}")?;
    Ok(())
}

/// Prints `value` as a versioned JSON document with `--json`, else as `text` words it.
fn show<T: Serialize>(
    cli: &Cli,
    out: &mut dyn Write,
    value: &T,
    text: impl FnOnce(&mut dyn Write, &T) -> Result<()>,
) -> Result<()> {
    if cli.json {
        print_json(out, value)
    } else {
        text(out, value)
    }
}

/// What every command gets.
struct Ctx<'a> {
    cli: &'a Cli,
    client: Client,
}

impl Ctx<'_> {
    fn call<T: serde::de::DeserializeOwned>(&self, request: &Request) -> Result<T> {
        Ok(self.client.call(request, &mut |_| {})?)
    }

    /// A request with progress on stderr.
    fn call_with_progress<T: serde::de::DeserializeOwned>(
        &self,
        request: &Request,
        label: &str,
    ) -> vmar::Result<T> {
        let mut reporter = Reporter::new(self.cli, label);
        let result = self.client.call(request, &mut |p| reporter.update(p));
        reporter.finish();
        result
    }

    fn images(&self) -> Result<ImagesResult> {
        self.call(&Request::Images)
    }
}

fn run(cli: &Cli, out: &mut dyn Write) -> Result<ExitClass> {
    let ctx = Ctx {
        cli,
        client: Client::new(&cli.socket),
    };
    match &cli.command {
        Command::Ping => ping(&ctx, out)?,
        Command::Capture {
            images,
            name,
            recapture,
            force_raw,
        } => return capture(&ctx, out, images, name.as_deref(), *recapture, *force_raw),
        Command::Images { table } => images(&ctx, out, table)?,
        Command::Map { name, extents } => map(&ctx, out, name, *extents)?,
        Command::Table { name, devices } => table(&ctx, out, name, devices)?,
        Command::Verify { name } => return verify(&ctx, out, name),
        Command::Forget { name } => forget(&ctx, out, name)?,
        Command::Create {
            name,
            image,
            capture,
            force_raw,
        } => create(&ctx, out, name, image, *capture, *force_raw)?,
        Command::Remove { name, deferred } => remove(&ctx, out, name, *deferred)?,
        Command::List { table } => list(&ctx, out, table)?,
        Command::Status { name, table } => status(&ctx, out, name, *table)?,
        Command::Refresh { name } => refresh(&ctx, out, name)?,
        Command::Stats { name, table } => stats(&ctx, out, name.as_deref(), table)?,
        Command::LibvirtXml {
            name,
            target,
            overlay,
        } => libvirt_xml(&ctx, out, name, target, overlay.as_deref())?,
        Command::Completions { shell } => completions(out, *shell)?,
        Command::Man { dir } => man::generate(
            <Cli as clap::CommandFactory>::command(),
            dir.as_deref(),
            out,
        )?,
        Command::Complete { what } => complete(&ctx, out, *what),
        // Handled in main: its exit statuses are Nagios', not the classes.
        Command::Check => unreachable!("check is run by main"),
    }
    Ok(ExitClass::Success)
}

/// `vmarctl check`: Nagios' exit status, 3 (UNKNOWN) when vmard cannot be asked.
fn check(cli: &Cli) -> ExitCode {
    let client = Client::new(&cli.socket);
    let mut out = std::io::stdout().lock();
    let report = match client.call::<CheckReport>(&Request::Check, &mut |_| {}) {
        Ok(report) => report,
        Err(e) => {
            if cli.json {
                print_error_json(&kind_of(&e), &e.to_string());
            } else {
                let _ = writeln!(out, "VMAR UNKNOWN - cannot ask vmard: {e}");
            }
            return ExitCode::from(Severity::Unknown as u8);
        }
    };
    let printed = if cli.json {
        print_json(&mut out, &report)
    } else {
        print_check(&mut out, &report)
    };
    if printed.is_err() {
        return ExitCode::from(Severity::Unknown as u8);
    }
    ExitCode::from(report.status as u8)
}

/// The summary line (with performance data), then one line per problem.
fn print_check(out: &mut dyn Write, report: &CheckReport) -> Result<()> {
    writeln!(
        out,
        "VMAR {} - {} of {} devices active and correct, {} of {} image roots usable | devices={} devices_ok={} roots={} roots_ok={}",
        report.status.label(),
        report.devices_ok,
        report.devices,
        report.roots_ok,
        report.roots,
        report.devices,
        report.devices_ok,
        report.roots,
        report.roots_ok
    )?;
    for problem in &report.problems {
        writeln!(
            out,
            "{}: {}: {}",
            problem.severity.label(),
            problem.subject,
            problem.message
        )?;
    }
    Ok(())
}

fn ping(ctx: &Ctx, out: &mut dyn Write) -> Result<()> {
    let pong: PingResult = ctx.call(&Request::Ping)?;
    if ctx.cli.json {
        // `version` is the document's: vmard's own goes under "vmard".
        return print_json(out, &serde_json::json!({ "vmard": pong }));
    }
    writeln!(
        out,
        "vmard {} (protocol {}) at {}, state in {}",
        pong.version,
        pong.protocol,
        ctx.cli.socket.display(),
        pong.state_dir.display()
    )?;
    for root in &pong.roots {
        if let Some(why) = &root.error {
            writeln!(
                out,
                "image root {} cannot be used: {why}",
                root.path.display()
            )?;
        }
    }
    for (device, why) in &pong.waiting {
        writeln!(out, "device {device} waits for its images: {why}")?;
    }
    Ok(())
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
    Result {
        #[serde(flatten)]
        result: Box<CaptureResult>,
        /// Images whose maps a re-capture rebuilt (the image and those that read from its
        /// old version).
        rebuilt: Vec<String>,
    },
    Error {
        kind: String,
        message: String,
    },
}

/// Names of the images captured at or after image `id`: those whose maps a re-capture or
/// forget of `id` rebuilds (the catalog rebuilds the maps from that image on).
fn capture(
    ctx: &Ctx,
    out: &mut dyn Write,
    images: &[PathBuf],
    name: Option<&str>,
    recapture: bool,
    force_raw: bool,
) -> Result<ExitClass> {
    if name.is_some() && images.len() > 1 {
        bail!(Usage(
            "--name applies to one image; capture the images one by one to name them".into()
        ));
    }
    let mut outcomes = Vec::new();
    let mut class = ExitClass::Success;
    for path in images {
        let absolute = std::path::absolute(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let request = Request::Capture {
            path: absolute,
            name: name.map(str::to_string),
            recapture,
            force_raw,
        };
        let label = format!("capture {}", path.display());
        let outcome = match ctx.call_with_progress::<CaptureResult>(&request, &label) {
            Ok(mut result) => {
                let rebuilt = if result.status == CaptureStatus::Recaptured {
                    std::iter::once(result.image.name.clone())
                        .chain(std::mem::take(&mut result.changed))
                        .collect()
                } else {
                    Vec::new()
                };
                if !ctx.cli.json {
                    print_capture(out, &result, &rebuilt)?;
                }
                CaptureEither::Result {
                    result: Box::new(result),
                    rebuilt,
                }
            }
            Err(e @ (vmar::Error::DaemonUnavailable { .. } | vmar::Error::SocketDenied { .. })) => {
                return Err(e.into());
            }
            Err(e) => {
                if class == ExitClass::Success {
                    class = e.exit_class();
                }
                let _ = writeln!(
                    std::io::stderr(),
                    "vmarctl: capture {}: {e}",
                    path.display()
                );
                CaptureEither::Error {
                    kind: kind_of(&e),
                    message: e.to_string(),
                }
            }
        };
        outcomes.push(CaptureOutcome {
            path: path.clone(),
            outcome,
        });
    }
    if ctx.cli.json {
        print_json(out, &serde_json::json!({ "images": outcomes }))?;
    }
    Ok(class)
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
    col("fingerprint", false, false),
    col("captured_at", true, false),
];

fn images(ctx: &Ctx, out: &mut dyn Write, args: &TableArgs) -> Result<()> {
    let list = ctx.images()?;
    if ctx.cli.json {
        return print_json(out, &list);
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
    Ok(())
}

fn map(ctx: &Ctx, out: &mut dyn Write, name: &str, extents: bool) -> Result<()> {
    let request = Request::Map {
        name: name.to_string(),
        extents,
    };
    let map: MapResult = ctx.call(&request)?;
    show(ctx.cli, out, &map, print_map)
}

fn table(ctx: &Ctx, out: &mut dyn Write, name: &str, devices: &[String]) -> Result<()> {
    let devices = parse_devices(devices)?;
    if !devices.is_empty() {
        // A --device for an image the table does not read would be silently ignored.
        let map: MapResult = ctx.call(&Request::Map {
            name: name.to_string(),
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
    let request = Request::Table {
        name: name.to_string(),
        devices,
    };
    let table: TableResult = ctx.call(&request)?;
    show(ctx.cli, out, &table, |out, table| {
        write!(out, "{}", table.text)?;
        Ok(())
    })
}

fn verify(ctx: &Ctx, out: &mut dyn Write, name: &str) -> Result<ExitClass> {
    let request = Request::Verify {
        name: name.to_string(),
    };
    let report: VerifyReport = ctx.call_with_progress(&request, &format!("verify {name}"))?;
    show(ctx.cli, out, &report, |out, report| {
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

/// Result of `forget` for `--json`: the record forgotten and the maps rebuilt.
#[derive(Serialize)]
struct Forgotten {
    #[serde(flatten)]
    record: ImageRecord,
    rebuilt: Vec<String>,
}

fn forget(ctx: &Ctx, out: &mut dyn Write, name: &str) -> Result<()> {
    let request = Request::Forget {
        name: name.to_string(),
    };
    let result: ForgetResult = ctx.call(&request)?;
    let forgotten = Forgotten {
        record: result.image,
        rebuilt: result.changed,
    };
    show(ctx.cli, out, &forgotten, |out, f| {
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
    })
}

fn create(
    ctx: &Ctx,
    out: &mut dyn Write,
    name: &str,
    image: &str,
    capture: bool,
    force_raw: bool,
) -> Result<()> {
    let image = if image.contains('/') {
        std::path::absolute(image)
            .with_context(|| format!("cannot resolve {image}"))?
            .display()
            .to_string()
    } else {
        image.to_string()
    };
    let request = Request::Create {
        name: name.to_string(),
        image: image.clone(),
        capture,
        force_raw,
    };
    let created: DeviceChange = ctx.call_with_progress(&request, &format!("create {name}"))?;
    show(ctx.cli, out, &created, |out, c| {
        print_change(out, "created", c)
    })
}

fn refresh(ctx: &Ctx, out: &mut dyn Write, name: &str) -> Result<()> {
    let request = Request::Refresh {
        name: name.to_string(),
    };
    let refreshed: DeviceChange = ctx.call(&request)?;
    show(ctx.cli, out, &refreshed, |out, c| {
        print_change(out, "refreshed", c)
    })
}

fn remove(ctx: &Ctx, out: &mut dyn Write, name: &str, deferred: bool) -> Result<()> {
    let request = Request::Remove {
        name: name.to_string(),
        deferred,
    };
    let removed: Removed = ctx.call(&request)?;
    show(ctx.cli, out, &removed, |out, removed| {
        if removed.deferred {
            writeln!(
                out,
                "{name}: open; removal deferred to its last close (`vmarctl list` shows it as removing)"
            )?;
        } else {
            writeln!(out, "removed {name}")?;
        }
        Ok(())
    })
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
];

fn list(ctx: &Ctx, out: &mut dyn Write, args: &TableArgs) -> Result<()> {
    let devices: Vec<DeviceStatus> = ctx.call(&Request::List)?;
    if ctx.cli.json {
        return print_json(out, &serde_json::json!({ "devices": devices }));
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
            ]
        })
        .collect();
    Table {
        columns: DEVICE_COLUMNS,
        rows,
    }
    .print(args, out)
}

/// `status` with the fingerprint of the device's image.
#[derive(Serialize)]
struct StatusDoc {
    #[serde(flatten)]
    status: DeviceStatus,
    /// Content fingerprint of the image the device serves (see `images`).
    fingerprint: Option<String>,
}

fn status(ctx: &Ctx, out: &mut dyn Write, name: &str, table: bool) -> Result<()> {
    let request = Request::Status {
        name: name.to_string(),
        table,
    };
    let status: DeviceStatus = ctx.call(&request)?;
    let fingerprint = match &status.image {
        Some(image) => ctx
            .images()?
            .images
            .into_iter()
            .find(|i| &i.name == image)
            .and_then(|i| i.fingerprint),
        None => None,
    };
    let doc = StatusDoc {
        status,
        fingerprint,
    };
    show(ctx.cli, out, &doc, print_status)
}

fn stats(ctx: &Ctx, out: &mut dyn Write, name: Option<&str>, args: &TableArgs) -> Result<()> {
    let request = Request::Stats {
        name: name.map(str::to_string),
    };
    let report: StatsReport = ctx.call(&request)?;
    if ctx.cli.json {
        return print_json(out, &report);
    }
    print_stats(out, &report, args)
}

fn libvirt_xml(
    ctx: &Ctx,
    out: &mut dyn Write,
    name: &str,
    target: &str,
    overlay: Option<&Path>,
) -> Result<()> {
    // The device must be one vmard knows.
    let _: DeviceStatus = ctx.call(&Request::Status {
        name: name.to_string(),
        table: false,
    })?;
    let overlay = overlay
        .map(std::path::absolute)
        .transpose()
        .context("cannot resolve the overlay path")?;
    let xml = vmar::libvirt::disk_xml(name, target, overlay.as_deref())?;
    if ctx.cli.json {
        print_json(out, &serde_json::json!({ "xml": xml }))
    } else {
        write!(out, "{xml}")?;
        Ok(())
    }
}

/// Bash: after clap's script, a wrapper that completes image and device arguments with the
/// names vmard knows (`vmarctl __complete`), and leaves everything else to clap's function.
const BASH_LIVE: &str = r#"
# Live names: image and device arguments complete from vmard (vmarctl __complete).
_vmarctl_live() {
    local cur=${COMP_WORDS[COMP_CWORD]} sub= kind= pos=0 i w
    local -a socket=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        case $w in
            --socket) socket=(--socket "${COMP_WORDS[i+1]}"); ((i++)) ;;
            --socket=*) socket=("$w") ;;
            -o|--options|--units|--separator|--name|--device|--target|--overlay) ((i++)) ;;
            -*) ;;
            *) if [[ -z $sub ]]; then sub=$w; else ((pos++)); fi ;;
        esac
    done
    if [[ $cur != -* ]]; then
        case $sub:$pos in
            map:0|table:0|verify:0|forget:0|create:1) kind=images ;;
            remove:0|status:0|refresh:0|stats:0|libvirt-xml:0) kind=devices ;;
        esac
    fi
    if [[ -n $kind ]]; then
        local IFS=$'\n'
        COMPREPLY=($(compgen -W "$(vmarctl "${socket[@]}" __complete "$kind" 2>/dev/null)" -- "$cur"))
        return 0
    fi
    _vmarctl "$@"
}
complete -F _vmarctl_live -o bashdefault -o default vmarctl
"#;

const FISH_LIVE: &str = r#"
# Live names from vmard (vmarctl __complete).
complete -c vmarctl -n '__fish_seen_subcommand_from map table verify forget create' -f -a '(vmarctl __complete images 2>/dev/null)'
complete -c vmarctl -n '__fish_seen_subcommand_from remove status refresh stats libvirt-xml' -f -a '(vmarctl __complete devices 2>/dev/null)'
"#;

fn completions(out: &mut dyn Write, shell: clap_complete::Shell) -> Result<()> {
    // clap_complete offers hidden subcommands too: leave __complete out of the scripts.
    let full = <Cli as clap::CommandFactory>::command();
    let mut command = clap::Command::new("vmarctl")
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "vmarctl", &mut script);
    out.write_all(&script)?;
    match shell {
        clap_complete::Shell::Bash => out.write_all(BASH_LIVE.as_bytes())?,
        clap_complete::Shell::Fish => out.write_all(FISH_LIVE.as_bytes())?,
        _ => {}
    }
    Ok(())
}

/// Prints image or device names; prints nothing when vmard cannot answer, since a shell
/// completing a word has nowhere to show an error.
fn complete(ctx: &Ctx, out: &mut dyn Write, what: Names) {
    let names: Vec<String> = match what {
        Names::Images => ctx
            .images()
            .map(|l| l.images.into_iter().map(|i| i.name).collect())
            .unwrap_or_default(),
        Names::Devices => ctx
            .call::<Vec<DeviceStatus>>(&Request::List)
            .map(|l| l.into_iter().map(|d| d.name).collect())
            .unwrap_or_default(),
    };
    for name in names {
        if writeln!(out, "{name}").is_err() {
            return;
        }
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

fn print_capture(out: &mut dyn Write, result: &CaptureResult, rebuilt: &[String]) -> Result<()> {
    let image = &result.image;
    let verb = match result.status {
        CaptureStatus::Captured => "captured",
        CaptureStatus::Recaptured => "re-captured",
        CaptureStatus::Unchanged => "unchanged, already captured as",
    };
    let s = &image.summary;
    writeln!(
        out,
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
    )?;
    if !rebuilt.is_empty() {
        writeln!(out, "rebuilt the maps of {}", rebuilt.join(", "))?;
    }
    Ok(())
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

fn print_stats(out: &mut dyn Write, report: &StatsReport, args: &TableArgs) -> Result<()> {
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
            Cell::Text(format!(
                "{}/{}/{}",
                d.targets.own, d.targets.redirected, d.targets.zero
            )),
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
    Table {
        columns: STATS_COLUMNS,
        rows,
    }
    .print(args, out)?;
    if !args.noheadings {
        writeln!(out, "(targets: own/redirected/zero)")?;
        writeln!(out)?;
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
    // -o names device columns; the image files table keeps its own.
    let files = TableArgs {
        fields: Vec::new(),
        ..args.clone()
    };
    Table {
        columns: CACHE_COLUMNS,
        rows,
    }
    .print(&files, out)?;
    if !args.noheadings {
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
