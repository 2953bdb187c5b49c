//! vmarctl: the command-line client of vmard.
//!
//! This file is the registry of subcommands: [`Command`] lists them with their help text, and
//! [`run`] hands each to the module that carries it out. A subcommand's arguments and code
//! live in its module (one per command or group of commands); what they share is in
//! [`context`] (the connection to vmard, progress) and [`output`] (JSON documents, errors,
//! exit classes), tables in [`table`], man pages in [`man`]. A new subcommand is a variant
//! here, an arm in [`run`], and its module (see docs/architecture.md).

mod capture;
mod context;
mod devices;
mod fleet;
mod images;
mod libvirt;
mod man;
mod maps;
mod monitor;
mod output;
mod prefetch;
mod shell;
mod stats;
mod table;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use vmar::client::Client;
use vmar::error::ExitClass;
use vmar::protocol::DEFAULT_SOCKET;

use context::{Ctx, Run};
use output::{broken_pipe, classify, print_error_json};

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

/// Every subcommand, in the order of `vmarctl --help`. The doc comment of a variant is its
/// help; its arguments are the struct its module defines.
#[derive(Subcommand, Debug)]
enum Command {
    /// Check that vmard answers.
    Ping,
    /// Hash raw images into the catalog (read-only; a captured, unchanged image is skipped).
    Capture(capture::CaptureArgs),
    /// List captured images in capture order, with their content fingerprints, whether each
    /// file is present or gone (deleted; served from vmar's hold on it) and what keeps it
    /// (devices that read it, images whose maps redirect into it), and what auto-capture did.
    Images(images::ImagesArgs),
    /// Show an image's block translation map.
    Map(maps::MapArgs),
    /// Print the device-mapper table of an image (512-byte sectors).
    Table(maps::DmTableArgs),
    /// Compare the reports hosts wrote with `capture --manifest MANIFEST`: which images have
    /// another content or map on some host (exit status 3 when any differ or are missing).
    FleetStatus(fleet::FleetStatusArgs),
    /// Read an image through its map and prove it equals the image.
    Verify(maps::VerifyArgs),
    /// Remove an image from the catalog (maps of later images are rebuilt).
    Forget(images::ForgetArgs),
    /// Create read-only device /dev/vmar/NAME serving a captured image.
    Create(devices::CreateArgs),
    /// Make sure device NAME serves IMAGE, creating it if needed (idempotent, for hooks and
    /// scripts): succeeds when it already serves that content, refuses other content.
    ///
    /// Without IMAGE: the image NAME is bound to (the content it served last), else the
    /// image called NAME. Prints whether it created the device.
    Ensure(devices::EnsureArgs),
    /// Remove a device; its loop devices go when no device uses them. An open device is
    /// refused unless --deferred.
    Remove(devices::RemoveArgs),
    /// List devices: saved, live, and their state (`removing`: waiting for its last user
    /// to close it); `-o +reason` says why a device is not active, when vmard knows.
    List(devices::ListArgs),
    /// Show one device: image, state, targets, loop devices, budget cost.
    Status(devices::StatusArgs),
    /// Load the current map of a device's image into the live device, atomically.
    Refresh(devices::RefreshArgs),
    /// Show what devices read, by redirected, own and zero extents; their target counts;
    /// and how much the page cache of the image files is shared.
    ///
    /// Two tables: devices, then the image files they read (fields image_file, size, cached,
    /// loop). `-o` prints the one table its fields belong to.
    Stats(stats::StatsArgs),
    /// Print metrics for Prometheus (text exposition format): device states, reads by class,
    /// cached and shared bytes, sharing factor, image health, catalog size, last restore.
    /// Works on the read-only socket.
    Metrics(monitor::MetricsArgs),
    /// List what reads an image: the devices serving it or an image that redirects to it,
    /// and the images whose maps redirect to it. Forget and capture --recapture refuse while
    /// a device reads it.
    Dependents(images::DependentsArgs),
    /// Say what the restore at vmard's start did; exit 3 when a saved device was not
    /// restored (vmar-restore-check.service runs it).
    RestoreStatus,
    /// List the content each device name is bound to (kept after `remove`, so that no
    /// overlay or domain over /dev/vmar/NAME reads other bytes): the image it served, its
    /// fingerprint, whether the device is saved now, and whether that content is still
    /// captured (`ensure NAME` can serve it). `create --rebind` binds a name anew. Works on
    /// the read-only socket.
    Bindings,
    /// Monitoring check (Nagios plugin): whether every saved device is active and correct
    /// (live, resumed, the table its image's map gives, images unchanged since capture) and
    /// every image root can be used. Prints a summary line, then one line per problem; exits
    /// 0 OK, 1 WARNING (a change in progress, a missing image root), 2 CRITICAL (a device not
    /// served as it should be), 3 UNKNOWN (vmard cannot be asked) instead of the classes of
    /// EXIT STATUS.
    Check,
    /// Print a libvirt <disk> element for a device.
    LibvirtXml(libvirt::LibvirtXmlArgs),
    /// libvirt's QEMU hook (/etc/libvirt/hooks/qemu.d/vmar runs it with the domain XML on
    /// stdin): at `prepare begin` it ensures every vmar device the domain's disks and their
    /// backing chains name, and fails the start with the reason if it cannot.
    LibvirtHook(libvirt::LibvirtHookArgs),
    /// Record what a live device read into its image's boot working set: the blocks of its
    /// dm-stats areas with reads whose pages are in the page cache now. Run it once the VM
    /// has booted (or let vmard do it: `record_after` in vmar.toml); later recordings of
    /// the same phase add to the set (union, at most 16,384 runs).
    Record(prefetch::RecordArgs),
    /// Show the working sets recorded for a device's (or an image's) image, by phase.
    WorkingSet(prefetch::WorkingSetArgs),
    /// Read the working sets of devices or images into the page cache before their VMs
    /// start: the union of their canonical blocks, each once, less what is cached, in disk
    /// order, merged into large requests, in the idle I/O priority class. Ctrl-C
    /// stops it; `--cancel` stops every running warm (also the background ones of
    /// `prefetch = "create"`).
    Warm(prefetch::WarmArgs),
    /// Print shell completions for vmarctl; bash and fish complete image and device names
    /// by asking vmard.
    Completions(shell::CompletionsArgs),
    /// Print vmarctl's man page (roff), or write it and a page per subcommand
    /// (vmarctl-COMMAND.1) into a directory.
    Man(shell::ManArgs),
    /// Names of images or devices, one a line, for shell completion (nothing on error).
    #[command(name = "__complete", hide = true)]
    Complete(shell::CompleteArgs),
}

/// `--timeout`: 0 (none), or at least 2 s, above vmard's heartbeat.
fn parse_timeout(text: &str) -> std::result::Result<u64, String> {
    match text.parse::<u64>() {
        Ok(1) => Err("1 s is within vmard's heartbeat; use 0 (no limit) or at least 2".into()),
        Ok(seconds) => Ok(seconds),
        Err(e) => Err(format!("{text:?}: {e}")),
    }
}

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
        return monitor::check(&cli.socket, cli.json);
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

/// Hands the subcommand to its module.
fn run(cli: &Cli, out: &mut dyn Write) -> Result<ExitClass> {
    let ctx = Ctx {
        json: cli.json,
        socket: &cli.socket,
        client: Client::new(&cli.socket).with_timeout(Some(Duration::from_secs(cli.timeout))),
    };
    let out = &mut *out;
    match &cli.command {
        Command::Ping => monitor::ping(&ctx, out),
        Command::Capture(args) => args.run(&ctx, out),
        Command::Images(args) => args.run(&ctx, out),
        Command::Map(args) => args.run(&ctx, out),
        Command::Table(args) => args.run(&ctx, out),
        Command::FleetStatus(args) => args.run(&ctx, out),
        Command::Verify(args) => args.run(&ctx, out),
        Command::Forget(args) => args.run(&ctx, out),
        Command::Create(args) => args.run(&ctx, out),
        Command::Ensure(args) => args.run(&ctx, out),
        Command::Remove(args) => args.run(&ctx, out),
        Command::List(args) => args.run(&ctx, out),
        Command::Status(args) => args.run(&ctx, out),
        Command::Refresh(args) => args.run(&ctx, out),
        Command::Stats(args) => args.run(&ctx, out),
        Command::Metrics(args) => args.run(&ctx, out),
        Command::Dependents(args) => args.run(&ctx, out),
        Command::RestoreStatus => monitor::restore_status(&ctx, out),
        Command::Bindings => devices::bindings(&ctx, out),
        Command::LibvirtXml(args) => args.run(&ctx, out),
        Command::LibvirtHook(args) => args.run(&ctx, out),
        Command::Record(args) => args.run(&ctx, out),
        Command::WorkingSet(args) => args.run(&ctx, out),
        Command::Warm(args) => args.run(&ctx, out),
        Command::Completions(args) => args.print(Cli::command(), out),
        Command::Man(args) => args.print(Cli::command(), out),
        Command::Complete(args) => args.run(&ctx, out),
        // Handled in main: its exit statuses are Nagios', not the classes.
        Command::Check => unreachable!("check is run by main"),
    }
}
