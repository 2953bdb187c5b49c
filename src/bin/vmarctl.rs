//! vmarctl: the command-line client of vmard.

#[path = "vmarctl/man.rs"]
mod man;
#[path = "vmarctl/prefetch.rs"]
mod prefetch;
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
    EnsureResult, ForgetResult, ImagesResult, MapResult, PingResult, Progress, Removed, Request,
    Severity, StatsReport, TableResult,
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

    /// Give up when vmard accepts nothing or sends nothing for SECONDS (0: wait forever;
    /// else at least 2). vmard sends progress or a heartbeat every second while it works, so
    /// long captures are not cut short: this only catches a stopped or hung vmard.
    #[arg(long, global = true, env = "VMAR_TIMEOUT", value_name = "SECONDS",
          default_value_t = vmar::client::DEFAULT_TIMEOUT.as_secs(),
          value_parser = parse_timeout)]
    timeout: u64,

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
        #[arg(required_unless_present = "manifest", conflicts_with = "manifest")]
        images: Vec<PathBuf>,
        /// Capture the images a fleet manifest lists (`PATH [NAME]` a line, paths relative
        /// to the manifest), in its order, then write this host's report of their content
        /// and map fingerprints to MANIFEST.hosts/HOST (see `fleet-status`).
        #[arg(long, value_name = "MANIFEST", conflicts_with = "name")]
        manifest: Option<PathBuf>,
        /// With --manifest: the name this host reports under [default: the host name].
        #[arg(long, requires = "manifest")]
        host: Option<String>,
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
    /// List captured images in capture order, with their content fingerprints, whether each
    /// file is present or gone (deleted; served from vmar's hold on it) and what keeps it
    /// (devices that read it, images whose maps redirect into it), and what auto-capture did.
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
    /// Compare the reports hosts wrote with `capture --manifest MANIFEST`: which images have
    /// another content or map on some host (exit status 3 when any differ or are missing).
    FleetStatus { manifest: PathBuf },
    /// Read an image through its map and prove it equals the image.
    Verify { name: String },
    /// Remove an image from the catalog (maps of later images are rebuilt).
    Forget { name: String },
    /// Create read-only device /dev/vmar/NAME serving a captured image.
    Create {
        #[arg(value_parser = device_arg)]
        name: String,
        /// A captured image's name, or the path of an image file.
        image: String,
        /// Capture the image file first if it is not captured yet.
        #[arg(long)]
        capture: bool,
        /// With --capture: capture even if the image looks like a container format.
        #[arg(long)]
        force_raw: bool,
        /// Serve other content than the name served before. A name remembers the image
        /// (fingerprint) it served, also after `remove`, because overlays and domains that
        /// name /dev/vmar/NAME would read the new bytes as theirs: re-bind only once nothing
        /// backs onto it.
        #[arg(long)]
        rebind: bool,
    },
    /// Make sure device NAME serves IMAGE, creating it if needed (idempotent, for hooks and
    /// scripts): succeeds when it already serves that content, refuses other content.
    ///
    /// Without IMAGE: the image NAME is bound to (the content it served last), else the
    /// image called NAME. Prints whether it created the device.
    Ensure {
        name: String,
        /// A captured image's name, or the path of an image file.
        image: Option<String>,
        /// Capture the image file first if it is not captured yet.
        #[arg(long)]
        capture: bool,
        /// With --capture: capture even if the image looks like a container format.
        #[arg(long)]
        force_raw: bool,
        /// Serve other content than the name served before (see `create --rebind`); never
        /// replaces a live device.
        #[arg(long)]
        rebind: bool,
    },
    /// Remove a device; its loop devices go when no device uses them. An open device is
    /// refused unless --deferred.
    Remove {
        /// NAME, /dev/vmar/NAME or /dev/mapper/vmar-NAME.
        #[arg(value_parser = device_arg)]
        name: String,
        /// Remove an open device when its last user closes it, as `dmsetup remove
        /// --deferred`; until then `list` shows it as `removing`. (`--force` is an old name
        /// for this; unlike dmsetup's --force it never replaces the table of a device in use.)
        #[arg(long, alias = "force")]
        deferred: bool,
    },
    /// List devices: saved, live, and their state (`removing`: waiting for its last user
    /// to close it); `-o +reason` says why a device is not active, when vmard knows.
    List {
        #[command(flatten)]
        table: TableArgs,
    },
    /// Show one device: image, state, targets, loop devices, budget cost.
    Status {
        /// NAME, /dev/vmar/NAME or /dev/mapper/vmar-NAME.
        #[arg(value_parser = device_arg)]
        name: String,
        /// Also print the live table as the kernel has it.
        #[arg(long)]
        table: bool,
    },
    /// Load the current map of a device's image into the live device, atomically.
    Refresh {
        /// NAME, /dev/vmar/NAME or /dev/mapper/vmar-NAME.
        #[arg(value_parser = device_arg)]
        name: String,
    },
    /// Show what devices read, by redirected, own and zero extents; their target counts;
    /// and how much the page cache of the image files is shared.
    ///
    /// Two tables: devices, then the image files they read (fields image_file, size, cached,
    /// loop). `-o` prints the one table its fields belong to.
    Stats {
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
    },
    /// Print metrics for Prometheus (text exposition format): device states, reads by class,
    /// cached and shared bytes, sharing factor, image health, catalog size, last restore.
    /// Works on the read-only socket.
    Metrics {
        /// Write them to FILE atomically (a temporary file renamed over it), as
        /// node_exporter's textfile collector needs; when vmard does not answer, FILE gets
        /// `vmar_up 0` and vmarctl exits 6.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// List what reads an image: the devices serving it or an image that redirects to it,
    /// and the images whose maps redirect to it. Forget and capture --recapture refuse while
    /// a device reads it.
    Dependents { image: String },
    /// Say what the restore at vmard's start did; exit 3 when a saved device was not
    /// restored (vmar-restore-check.service runs it).
    RestoreStatus,
    /// Monitoring check (Nagios plugin): whether every saved device is active and correct
    /// (live, resumed, the table its image's map gives, images unchanged since capture) and
    /// every image root can be used. Prints a summary line, then one line per problem; exits
    /// 0 OK, 1 WARNING (a change in progress, a missing image root), 2 CRITICAL (a device not
    /// served as it should be), 3 UNKNOWN (vmard cannot be asked) instead of the classes of
    /// EXIT STATUS.
    Check,
    /// Print a libvirt <disk> element for a device.
    LibvirtXml {
        #[arg(value_parser = device_arg)]
        name: String,
        /// Guest disk name.
        #[arg(long, default_value = "vda")]
        target: String,
        /// A qcow2 overlay file backed by the device. A missing one is created (after
        /// `ensure NAME`) with `qemu-img create -f qcow2 -b /dev/vmar/NAME -F raw FILE`; an
        /// existing one must be qcow2 backed by /dev/vmar/NAME declared raw, of the image's
        /// size (`qemu-img info --backing-chain`), or is refused (exit status 5). Without
        /// --overlay the disk is the device itself, read-only.
        #[arg(long)]
        overlay: Option<PathBuf>,
    },
    /// libvirt's QEMU hook (/etc/libvirt/hooks/qemu.d/vmar runs it with the domain XML on
    /// stdin): at `prepare begin` it ensures every vmar device the domain's disks and their
    /// backing chains name, and fails the start with the reason if it cannot.
    LibvirtHook {
        /// Domain name.
        domain: String,
        /// libvirt's operation (prepare, start, started, stopped, release, migrate, ...).
        operation: String,
        /// Its sub-operation (begin, end, -).
        sub_operation: String,
        /// libvirt's extra argument (unused).
        extra: Option<String>,
    },
    #[command(flatten)]
    Prefetch(prefetch::Prefetch),
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

/// `--timeout`: 0 (none), or at least 2 s, above vmard's heartbeat.
fn parse_timeout(text: &str) -> std::result::Result<u64, String> {
    match text.parse::<u64>() {
        Ok(1) => Err("1 s is within vmard's heartbeat; use 0 (no limit) or at least 2".into()),
        Ok(seconds) => Ok(seconds),
        Err(e) => Err(format!("{text:?}: {e}")),
    }
}

/// A device argument: `NAME`, `/dev/vmar/NAME` or `/dev/mapper/vmar-NAME`.
fn device_arg(argument: &str) -> Result<String, String> {
    Ok(vmar::kernel::device_name(argument).to_string())
}

/// A usage error found after parsing (exit status 2, kind `usage`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

fn main() -> ExitCode {
    // Arguments need not be UTF-8 (paths): compare them as OS strings.
    let json = std::env::args_os().skip(1).any(|a| a == "--json");
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
        client: Client::new(&cli.socket).with_timeout(Some(Duration::from_secs(cli.timeout))),
    };
    match &cli.command {
        Command::Ping => ping(&ctx, out)?,
        Command::Capture {
            images,
            name,
            recapture,
            force_raw,
            manifest: Some(manifest),
            host,
        } => {
            let _ = (images, name);
            return capture_manifest(&ctx, out, manifest, host.as_deref(), *recapture, *force_raw);
        }
        Command::Capture {
            images,
            name,
            recapture,
            force_raw,
            manifest: None,
            host: _,
        } => {
            if name.is_some() && images.len() > 1 {
                bail!(Usage(
                    "--name applies to one image; capture the images one by one to name them"
                        .into()
                ));
            }
            let items: Vec<(PathBuf, Option<String>)> =
                images.iter().map(|p| (p.clone(), name.clone())).collect();
            let (class, outcomes) = capture(&ctx, out, &items, *recapture, *force_raw)?;
            if ctx.cli.json {
                print_json(out, &serde_json::json!({ "images": outcomes }))?;
            }
            return Ok(class);
        }
        Command::FleetStatus { manifest } => return fleet_status(&ctx, out, manifest),
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
            rebind,
        } => create(&ctx, out, name, image, *capture, *force_raw, *rebind)?,
        Command::Ensure {
            name,
            image,
            capture,
            force_raw,
            rebind,
        } => ensure(
            &ctx,
            out,
            name,
            image.as_deref(),
            *capture,
            *force_raw,
            *rebind,
        )?,
        Command::LibvirtHook {
            domain,
            operation,
            sub_operation,
            extra: _,
        } => libvirt_hook(&ctx, domain, operation, sub_operation)?,
        Command::Remove { name, deferred } => remove(&ctx, out, name, *deferred)?,
        Command::List { table } => list(&ctx, out, table)?,
        Command::Status { name, table } => status(&ctx, out, name, *table)?,
        Command::Refresh { name } => refresh(&ctx, out, name)?,
        Command::Stats {
            name,
            table,
            interval,
            count,
        } => stats(&ctx, out, name.as_deref(), table, *interval, *count)?,
        Command::Metrics { output } => metrics(&ctx, out, output.as_deref())?,
        Command::Dependents { image } => dependents(&ctx, out, image)?,
        Command::RestoreStatus => return restore_status(&ctx, out),
        Command::LibvirtXml {
            name,
            target,
            overlay,
        } => libvirt_xml(&ctx, out, name, target, overlay.as_deref())?,
        Command::Prefetch(command) => prefetch::run(&ctx, out, command)?,
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

/// Ctrl-C during a capture: say what becomes of it, then end as interrupted (130). Closing
/// the connection is what cancels it in vmard, at its next batch of blocks.
fn on_interrupt_of_capture() {
    extern "C" fn interrupted(_: nix::libc::c_int) {
        const MESSAGE: &[u8] = b"\nvmarctl: interrupted: vmard cancels the capture at its next batch and keeps nothing of it (one already being saved to the catalog completes: see `vmarctl images`)\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MESSAGE is static.
        unsafe {
            nix::libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
            nix::libc::_exit(130);
        }
    }
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(interrupted),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only calls async-signal-safe functions.
    let installed =
        unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGINT, &action) };
    if let Err(e) = installed {
        let _ = writeln!(std::io::stderr(), "vmarctl: cannot handle Ctrl-C: {e}");
    }
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
    images: &[(PathBuf, Option<String>)],
    recapture: bool,
    force_raw: bool,
) -> Result<(ExitClass, Vec<CaptureOutcome>)> {
    // vmard's protocol and records carry paths as text: refuse others before asking.
    if let Some((path, _)) = images.iter().find(|(p, _)| p.to_str().is_none()) {
        bail!(Usage(format!(
            "{}: the path is not valid UTF-8, and vmar records image paths as text: rename \
             the file (or its directory) to a UTF-8 name",
            path.display()
        )));
    }
    on_interrupt_of_capture();
    let mut outcomes = Vec::new();
    let mut class = ExitClass::Success;
    for (path, name) in images {
        let absolute = std::path::absolute(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        let request = Request::Capture {
            path: absolute,
            name: name.clone(),
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
            Err(
                e @ (vmar::Error::DaemonUnavailable { .. }
                | vmar::Error::DaemonTimeout { .. }
                | vmar::Error::SocketDenied { .. }),
            ) => {
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
    Ok((class, outcomes))
}

/// `capture --manifest`: the manifest's images in its order, then this host's report.
fn capture_manifest(
    ctx: &Ctx,
    out: &mut dyn Write,
    manifest: &Path,
    host: Option<&str>,
    recapture: bool,
    force_raw: bool,
) -> Result<ExitClass> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    let base = std::path::absolute(manifest)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let entries = vmar::fleet::parse_manifest(&text, &base)
        .map_err(|e| Usage(format!("{}: {e}", manifest.display())))?;
    let host = match host {
        Some(host) => host.to_string(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("cannot read the host name (give --host)")?
            .trim()
            .to_string(),
    };
    if host.is_empty() || host.contains('/') || host.starts_with('.') {
        bail!(Usage(format!("--host {host:?}: give a plain name")));
    }
    let items: Vec<(PathBuf, Option<String>)> =
        entries.into_iter().map(|e| (e.path, e.name)).collect();
    let (class, outcomes) = capture(ctx, out, &items, recapture, force_raw)?;
    let names: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match &o.outcome {
            CaptureEither::Result { result, .. } => Some(result.image.name.clone()),
            CaptureEither::Error { .. } => None,
        })
        .collect();
    let lines = fleet_lines(ctx, &names)?;
    let dir = PathBuf::from(format!("{}.hosts", manifest.display()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let report = dir.join(&host);
    let tmp = dir.join(format!(".{host}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, vmar::fleet::format_report(&lines))
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &report))
        .with_context(|| format!("cannot write {}", report.display()))?;
    if ctx.cli.json {
        print_json(
            out,
            &serde_json::json!({ "images": outcomes, "report": report, "host": host }),
        )?;
    } else {
        writeln!(out, "report of host {host}: {}", report.display())?;
    }
    Ok(class)
}

/// This host's `name fingerprint map-fingerprint` of each of `names`.
fn fleet_lines(ctx: &Ctx, names: &[String]) -> Result<Vec<vmar::fleet::Line>> {
    let images = ctx.images()?.images;
    let by_id: BTreeMap<u32, Option<String>> = images
        .iter()
        .map(|i| (i.id, i.fingerprint.clone()))
        .collect();
    let mut lines = Vec::new();
    for name in names {
        let map: MapResult = ctx.call(&Request::Map {
            name: name.clone(),
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
fn fleet_status(ctx: &Ctx, out: &mut dyn Write, manifest: &Path) -> Result<ExitClass> {
    let dir = PathBuf::from(format!("{}.hosts", manifest.display()));
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
    if ctx.cli.json {
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

/// The first hex digits of a `blake3:HEX` fingerprint (content/map), enough to tell apart.
fn short(fingerprint: &str) -> &str {
    let hex = fingerprint.strip_prefix("blake3:").unwrap_or(fingerprint);
    hex.get(..12).unwrap_or(hex)
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
fn file_cell(file: Option<&vmar::protocol::ImageFileState>) -> Cell {
    match file {
        None => Cell::None,
        Some(f) if f.state == "present" => Cell::Text(f.state.clone()),
        Some(f) if f.hold.is_some() => Cell::Text(format!("{} (held)", f.state)),
        Some(f) => Cell::Text(format!("{} (not held)", f.state)),
    }
}

/// The `kept_by` cell of `images`: the devices that read it and the images whose maps
/// redirect into it, e.g. `vm1,vm2 +images:web`.
fn kept_by_cell(file: Option<&vmar::protocol::ImageFileState>) -> Cell {
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

fn create(
    ctx: &Ctx,
    out: &mut dyn Write,
    name: &str,
    image: &str,
    capture: bool,
    force_raw: bool,
    rebind: bool,
) -> Result<()> {
    if capture {
        on_interrupt_of_capture();
    }
    let request = Request::Create {
        name: name.to_string(),
        image: image_reference(image)?,
        capture,
        force_raw,
        rebind,
    };
    let created: DeviceChange = ctx.call_with_progress(&request, &format!("create {name}"))?;
    show(ctx.cli, out, &created, |out, c| {
        print_change(out, "created", c)
    })
}

fn ensure(
    ctx: &Ctx,
    out: &mut dyn Write,
    name: &str,
    image: Option<&str>,
    capture: bool,
    force_raw: bool,
    rebind: bool,
) -> Result<()> {
    let request = Request::Ensure {
        name: name.to_string(),
        image: image.map(image_reference).transpose()?,
        capture,
        force_raw,
        rebind,
    };
    let ensured: EnsureResult = ctx.call_with_progress(&request, &format!("ensure {name}"))?;
    show(ctx.cli, out, &ensured, |out, e| {
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
    })
}

/// The libvirt hook: ensures the vmar devices a starting domain names. Output goes to
/// stderr, which libvirt puts in the error of a start it fails.
fn libvirt_hook(ctx: &Ctx, domain: &str, operation: &str, sub_operation: &str) -> Result<()> {
    use std::io::Read;
    // libvirt writes the XML whatever the operation: read it all so it never gets EPIPE.
    let mut xml = String::new();
    std::io::stdin()
        .read_to_string(&mut xml)
        .context("cannot read the domain XML on stdin")?;
    if (operation, sub_operation) != ("prepare", "begin") {
        return Ok(());
    }
    let disks =
        vmar::hook::domain_disks(&xml).with_context(|| format!("vmar hook: domain {domain}"))?;
    let mut names = disks.devices;
    for image in &disks.probe {
        // An image that cannot be read is libvirt's to report when it opens it.
        match vmar::overlay::chain_devices(image) {
            Ok(found) => names.extend(found),
            Err(e) => eprintln!(
                "vmar hook: domain {domain}: not following {}: {e}",
                image.display()
            ),
        }
    }
    let mut failed = Vec::new();
    for name in &names {
        let request = Request::Ensure {
            name: name.clone(),
            image: None,
            capture: false,
            force_raw: false,
            rebind: false,
        };
        if let Err(e) = ctx.call::<EnsureResult>(&request) {
            failed.push(format!("/dev/vmar/{name}: {e:#}"));
        }
    }
    if !failed.is_empty() {
        bail!(
            "vmar hook: domain {domain} cannot start: {}",
            failed.join("; ")
        );
    }
    Ok(())
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
    col("reason", false, false),
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
                d.reason.clone().map_or(Cell::None, Cell::Text),
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
            .and_then(|i| i.record.fingerprint),
        None => None,
    };
    let doc = StatusDoc {
        status,
        fingerprint,
    };
    show(ctx.cli, out, &doc, print_status)
}

fn stats(
    ctx: &Ctx,
    out: &mut dyn Write,
    name: Option<&str>,
    args: &TableArgs,
    interval: Option<f64>,
    count: Option<u64>,
) -> Result<()> {
    let request = Request::Stats {
        name: name.map(str::to_string),
    };
    let tables = stats_tables(args)?;
    let Some(interval) = interval else {
        let report: StatsReport = ctx.call(&request)?;
        if ctx.cli.json {
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
        let report: StatsReport = ctx.call(&request)?;
        let shown = match &previous {
            Some(before) => stats_delta(before, &report),
            None => report.clone(),
        };
        if ctx.cli.json {
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

fn metrics(ctx: &Ctx, out: &mut dyn Write, output: Option<&Path>) -> Result<()> {
    let result = ctx.call::<vmar::protocol::MetricsResult>(&Request::Metrics);
    let Some(path) = output else {
        let result = result?;
        if ctx.cli.json {
            return print_json(out, &result);
        }
        out.write_all(result.text.as_bytes())?;
        return Ok(());
    };
    let (text, failure) = match result {
        Ok(result) => (result.text, None),
        Err(e) => (vmar::metrics::unreachable(), Some(e)),
    };
    write_atomically(path, text.as_bytes())?;
    if let Some(e) = failure {
        return Err(e.context(format!("{} says vmar_up 0", path.display())));
    }
    Ok(())
}

/// Writes `path` through a temporary file in its directory renamed over it: a reader sees
/// the old file or the new one, never half of one. The temporary name does not end in
/// `.prom`, so node_exporter never reads it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new()
        .prefix(".vmar-metrics-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.as_file().sync_all())
        .with_context(|| format!("cannot write {}", file.path().display()))?;
    std::fs::set_permissions(
        file.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    file.persist(path)
        .with_context(|| format!("cannot rename into {}", path.display()))?;
    Ok(())
}

const DEPENDENT_COLUMNS: &[Column] = &[
    col("kind", false, true),
    col("name", false, true),
    col("node", false, true),
    col("serves", false, true),
    col("blocks", true, true),
];

fn dependents(ctx: &Ctx, out: &mut dyn Write, image: &str) -> Result<()> {
    let found: vmar::protocol::Dependents = ctx.call(&Request::Dependents {
        name: image.to_string(),
    })?;
    if ctx.cli.json {
        return print_json(out, &found);
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
    .print(&TableArgs::default(), out)
}

fn restore_status(ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
    let status: vmar::protocol::RestoreStatus = ctx.call(&Request::RestoreStatus)?;
    show(ctx.cli, out, &status, |out, s| {
        match (&s.report, &s.error) {
            _ if !s.ran => writeln!(out, "vmard did not restore devices (--no-restore)")?,
            (_, Some(e)) => writeln!(out, "devices were not restored: {e}")?,
            (Some(r), None) => {
                writeln!(
                    out,
                    "restored at start: {} created, {} unchanged, {} repaired, {} failed",
                    r.created.len(),
                    r.unchanged.len(),
                    r.repaired.len(),
                    r.failed.len()
                )?;
                for (name, why) in &r.failed {
                    writeln!(
                        out,
                        "  {name} ({}): {why}",
                        vmar::kernel::node_path(name).display()
                    )?;
                }
            }
            (None, None) => writeln!(out, "devices were not restored")?,
        }
        Ok(())
    })?;
    Ok(if status.ok() {
        ExitClass::Success
    } else {
        ExitClass::CheckFailed
    })
}

fn libvirt_xml(
    ctx: &Ctx,
    out: &mut dyn Write,
    name: &str,
    target: &str,
    overlay: Option<&Path>,
) -> Result<()> {
    // libvirt's XML is text: a path that is not UTF-8 would be written altered.
    if let Some(path) = overlay.filter(|p| p.to_str().is_none()) {
        bail!(Usage(format!(
            "--overlay {}: the path is not valid UTF-8, and libvirt's XML holds text: rename it",
            path.display()
        )));
    }
    let overlay = overlay
        .map(std::path::absolute)
        .transpose()
        .context("cannot resolve the overlay path")?;
    match &overlay {
        Some(path) => {
            if path.exists() {
                // Its header first (readable without the device): over this device, raw.
                let top = vmar::overlay::parse_info(path, &vmar::overlay::info(path, false)?)?;
                vmar::overlay::check_top(path, &top, name)?;
            }
            // The device must serve the content its name is bound to, live, so that qemu-img
            // can open the whole chain.
            let ensured: EnsureResult = ctx.call(&Request::Ensure {
                name: name.to_string(),
                image: None,
                capture: false,
                force_raw: false,
                rebind: false,
            })?;
            if path.exists() {
                // An existing overlay must be directly over this device, of its image's size.
                let size = ctx
                    .images()?
                    .images
                    .into_iter()
                    .find(|i| i.name == ensured.image)
                    .map(|i| i.size)
                    .with_context(|| format!("image {} is not in the catalog", ensured.image))?;
                let chain = vmar::overlay::parse_chain(path, &vmar::overlay::info(path, true)?)?;
                vmar::overlay::check_chain(path, &chain, name, size)?;
            } else {
                vmar::overlay::create(path, name)?;
            }
        }
        None => {
            // The device must be one vmard knows.
            let _: DeviceStatus = ctx.call(&Request::Status {
                name: name.to_string(),
                table: false,
            })?;
        }
    }
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
            remove:0|status:0|refresh:0|stats:0|libvirt-xml:0|ensure:0) kind=devices ;;
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
complete -c vmarctl -n '__fish_seen_subcommand_from remove status refresh stats libvirt-xml ensure' -f -a '(vmarctl __complete devices 2>/dev/null)'
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
            .map(|l| l.images.into_iter().map(|i| i.record.name).collect())
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
    if let Some(sidecar) = &result.sidecar {
        let path = sidecar.path.display();
        if sidecar.imported {
            writeln!(
                out,
                "digests imported from sidecar {path} ({} blocks checked)",
                sidecar.sampled_blocks
            )?;
        }
        if let Some(why) = &sidecar.refused {
            writeln!(out, "sidecar {path} refused ({why}); the image was hashed")?;
        }
        if sidecar.written {
            writeln!(out, "sidecar written: {path}")?;
        }
        if let Some(why) = &sidecar.write_error {
            writeln!(out, "sidecar not written: {why}")?;
        }
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
