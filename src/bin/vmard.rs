//! vmard: the vmar daemon. Owns the catalog and answers vmarctl over a local socket.

#[path = "vmard/man.rs"]
mod man;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Group;
use vmar::catalog::Catalog;
use vmar::kernel::{Checked, Kernel, real::RealKernel, sim::SimKernel};
use vmar::protocol::{DEFAULT_RO_SOCKET, DEFAULT_SOCKET};
use vmar::server::{Access, DEFAULT_STATE_DIR, Server};
use vmar::service::{Context, KernelOpener, Settings};

/// The vmar daemon: captures VM images into its catalog and serves them as shared dm devices.
#[derive(Parser, Debug)]
#[command(name = "vmard", version)]
struct Args {
    /// Directory of the catalog.
    #[arg(long, env = "VMAR_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

    /// Unix socket to listen on.
    #[arg(long, env = "VMAR_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,

    /// Read-only socket (mode 0666): serves anyone the requests that only read (ping,
    /// images, map, table, list, status, stats, metrics, dependents, restore-status), for
    /// monitoring [default: vmard.ro.sock beside --socket].
    #[arg(long, env = "VMAR_RO_SOCKET", value_name = "PATH")]
    ro_socket: Option<PathBuf>,

    /// No read-only socket.
    #[arg(long, conflicts_with = "ro_socket")]
    no_ro_socket: bool,

    /// Check the configuration file and the options, print what they give, and exit: 0 when
    /// vmard would start with them (or a SIGHUP would load them), 1 when not. The unit's
    /// ExecReload runs it first, so that `systemctl reload` fails on a bad file.
    #[arg(long)]
    check_config: bool,

    /// Configuration file (image_roots, socket_group, max_targets, auto_capture,
    /// on_image_change, refuse_image_writes, image_check_interval, image_check_samples);
    /// options override it.
    /// SIGHUP re-reads it.
    #[arg(long, env = "VMAR_CONFIG", default_value = vmar::config::DEFAULT_CONFIG)]
    config: PathBuf,

    /// A directory whose files may be captured (repeatable; adds to image_roots). Nothing
    /// outside the image roots can be captured.
    #[arg(long = "image-root", value_name = "DIR")]
    image_roots: Vec<PathBuf>,

    /// Most device-mapper targets of one device table; longer maps give up their least
    /// useful redirections to fit [default: 100000].
    #[arg(long, env = "VMAR_MAX_TARGETS")]
    max_targets: Option<u64>,

    /// Do not restore saved devices at start-up.
    #[arg(long)]
    no_restore: bool,

    /// Seconds between looks at the image roots: a root that appears (or a file system
    /// mounted on one) makes vmard restore the saved devices it could not serve; those still
    /// waiting are tried again at ten times this interval, and at SIGHUP.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    retry_interval: u64,

    /// Rebuild a lost or damaged catalog from its backup (state dir's backup/: catalog.json and journal.jsonl):
    /// refused while another vmard uses the state dir. The images are captured again in
    /// their original order and their devices saved again into a new catalog built aside
    /// (recovering-*); once complete, it replaces the old catalog, index and backup, which
    /// are kept in broken-*. A recovery killed once its catalog was complete is finished by
    /// the next start; killed before, it left the state dir as it was. Then vmard starts as
    /// usual.
    #[arg(long)]
    recover: bool,

    /// Run on a simulated kernel whose state lives in DIR instead of the real one (tests,
    /// trying vmar without root).
    #[arg(long, value_name = "DIR")]
    sim: Option<PathBuf>,

    /// Print this manual page (roff, section 8) and exit; `make install` uses it.
    #[arg(long, hide = true)]
    man: bool,

    /// Print vmar.toml(5), the configuration file's manual page (roff), and exit.
    #[arg(long, hide = true)]
    man_config: bool,

    /// Group whose members may use the socket besides root (socket mode 0660).
    #[arg(long, env = "VMAR_SOCKET_GROUP")]
    socket_group: Option<String>,
}

fn main() -> Result<()> {
    // Under systemd, journald stamps every line: do not add a second timestamp.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logger = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journald && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if journald {
        logger.without_time().init();
    } else {
        logger.init();
    }
    let args = Args::parse();
    if args.man {
        man::vmard(
            <Args as clap::CommandFactory>::command(),
            &mut std::io::stdout(),
        )?;
        return Ok(());
    }
    if args.man_config {
        man::vmar_toml(&mut std::io::stdout())?;
        return Ok(());
    }
    if args.check_config {
        return check_config(&args);
    }
    // Tests' fault injection: a misspelt step stops vmard instead of injecting nothing.
    vmar::fault::init()?;
    // Signals are taken by one thread with sigwait: block them before any thread starts.
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals.thread_block().context("cannot block signals")?;

    // Read once: every part of the start sees the same file.
    let config = load_config(&args)?;
    let (settings, group) = load_settings(&args, &config)?;
    let sidecars = load_sidecars(&args, &config)?;
    let catalog = if args.recover {
        let (catalog, recovery) =
            Catalog::recover(&args.state_dir).context("cannot recover the catalog")?;
        for (name, why) in &recovery.skipped {
            tracing::error!(image = %name, "not recovered: {why}");
        }
        tracing::info!(
            images = ?recovery.images,
            devices = ?recovery.devices,
            skipped = recovery.skipped.len(),
            "catalog recovered from its backup"
        );
        catalog
    } else {
        Catalog::open(&args.state_dir).context("cannot open the catalog")?
    };
    // Holds beside images would change what other hosts see of a shared image.
    vmar::holds::allow_beside(config.hold_beside_images.unwrap_or(true) && sidecars.is_none());
    catalog.set_sidecars(sidecars);
    let instance = vmar::instance::InstanceId::load_or_create(&args.state_dir)
        .context("cannot read the state dir's instance id")?;
    let opener: KernelOpener = match args.sim.clone() {
        Some(dir) => {
            let sim = SimKernel::open(&dir)?;
            // The simulated loop devices find deleted images through vmar's holds.
            sim.add_link_dir(&args.state_dir.join(vmar::holds::HOLDS_DIR))?;
            Box::new(move || Ok(Arc::new(Checked(sim.clone())) as Arc<dyn Kernel>))
        }
        None => Box::new(|| Ok(Arc::new(Checked(RealKernel::open()?)) as Arc<dyn Kernel>)),
    };
    let context = Context::new(catalog, instance, settings, opener);
    let mut server =
        Server::bind(context, &args.socket, Access { group }).context("cannot start vmard")?;
    if let Some(ro) = ro_socket(&args) {
        server
            .bind_read_only(&ro)
            .context("cannot start vmard's read-only socket")?;
    }
    // Restore saved devices before reporting ready, so that units ordered after vmard (VMs)
    // find their devices. A device that cannot be served is reported and skipped. Clients
    // that connect meanwhile wait in the socket's backlog.
    if args.sim.is_none() {
        remove_stale_nodes(server.context());
    }
    let status = if args.no_restore {
        "devices not restored (--no-restore)".to_string()
    } else {
        restore(server.context())
    };
    let status = with_health(server.context(), status);
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ],
    );
    start_watchdog(server.socket().to_path_buf());
    tracing::info!(
        socket = %server.socket().display(),
        ro_socket = ?server.read_only_socket(),
        state_dir = %args.state_dir.display(),
        %status,
        "vmard ready"
    );

    start_auto_capture(&args, &config, server.socket(), server.context())?;
    start_guard(&config, server.context())?;
    vmar::service::hold_older_images(Arc::clone(server.context()));
    let host: Arc<dyn vmar::prefetch::Host> = Arc::clone(server.context()) as _;
    vmar::prefetch::start_recorder(Arc::downgrade(&host)).context("cannot start the recorder")?;
    if !args.no_restore {
        start_retries(Arc::clone(server.context()), args.retry_interval)?;
    }

    let stopper = server.stopper();
    let context = Arc::clone(server.context());
    std::thread::Builder::new()
        .name("vmard-signals".into())
        .spawn(move || {
            loop {
                match signals.wait() {
                    Ok(Signal::SIGHUP) => {
                        reload(&args, &context);
                        if !args.no_restore {
                            retry(&context, "configuration reloaded");
                        }
                    }
                    Ok(signal) => {
                        tracing::info!(%signal, "stopping: finishing requests in flight");
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                        stopper.stop();
                        return;
                    }
                    Err(e) => {
                        tracing::error!("cannot wait for signals: {e}");
                        return;
                    }
                }
            }
        })
        .context("cannot start the signal thread")?;
    server.run().context("vmard stopped")?;
    // Stamp the index runs written since the start, so that the next start hashes none.
    if let Err(e) = server.context().catalog.stamp_index() {
        tracing::warn!("index runs not stamped; the next start verifies them: {e}");
    }
    // Closed here, not when the last holder of the context drops it (threads that run
    // until the process exits hold it): a catalog left open is repaired at the next start.
    server.context().catalog.close();
    // Devices stay as they are.
    drop(server);
    tracing::info!("vmard stopped; catalog closed, devices left running");
    Ok(())
}

/// Digest sidecar use from the configuration file (`sidecars`, `sidecar_*`).
fn load_sidecars(
    args: &Args,
    config: &vmar::config::Config,
) -> Result<Option<vmar::sidecar::Sidecars>> {
    let sidecars = vmar::sidecar::Sidecars::from_config(config)
        .with_context(|| format!("bad sidecar settings in {}", args.config.display()))?;
    if let Some(s) = &sidecars {
        tracing::info!(mode = ?s.mode(), "digest sidecars on");
    }
    Ok(sidecars)
}

/// The configuration file (the default one may be absent; one named explicitly must exist).
fn load_config(args: &Args) -> Result<vmar::config::Config> {
    let explicit = args.config.as_os_str() != vmar::config::DEFAULT_CONFIG;
    Ok(vmar::config::Config::load(&args.config, explicit)?)
}

/// Settings and socket group from the configuration file and the options.
fn load_settings(
    args: &Args,
    config: &vmar::config::Config,
) -> Result<(Settings, Option<nix::unistd::Gid>)> {
    let max_targets = args
        .max_targets
        .or(config.max_targets)
        .unwrap_or(vmar::device::DEFAULT_MAX_TARGETS);
    let mut roots = config.image_roots.clone();
    roots.extend(args.image_roots.iter().cloned());
    // A missing root stops nothing: the devices on the others are restored, and this one is
    // looked at again (see start_retries).
    let roots = vmar::roots::ImageRoots::resolve(&roots);
    for (root, why) in roots.missing() {
        tracing::error!(
            root = %root.display(),
            "image root cannot be used: {why}; devices with images there are restored when it appears"
        );
    }
    if roots.configured().is_empty() {
        tracing::warn!(
            "no image roots configured: nothing can be captured (set image_roots in {})",
            args.config.display()
        );
    }
    let socket_group = args.socket_group.clone().or(config.socket_group.clone());
    let group = match &socket_group {
        Some(name) => Some(
            Group::from_name(name)
                .with_context(|| format!("cannot look up group {name:?}"))?
                .with_context(|| format!("no group named {name:?}"))?
                .gid,
        ),
        None => None,
    };
    // Applied here, once the whole file is known good; SIGHUP also makes the guard check.
    let (mode, record_after) = config.prefetch(&args.config)?;
    vmar::guard::set_settings(config.guard(&args.config)?);
    let merge_gap = config.prefetch_merge_gap(&args.config)?;
    vmar::prefetch::set_settings(vmar::prefetch::Settings {
        mode,
        record_after,
        merge_gap,
    });
    Ok((Settings { max_targets, roots }, group))
}

/// The read-only socket: as given, none, or `vmard.ro.sock` beside the main socket (so that
/// a vmard started with another --socket, as the tests do, does not take the system's).
fn ro_socket(args: &Args) -> Option<PathBuf> {
    if args.no_ro_socket {
        return None;
    }
    if let Some(path) = &args.ro_socket {
        return Some(path.clone());
    }
    if args.socket.as_os_str() == DEFAULT_SOCKET {
        return Some(PathBuf::from(DEFAULT_RO_SOCKET));
    }
    let name = args.socket.file_name()?.to_string_lossy().into_owned();
    let ro = match name.strip_suffix(".sock") {
        Some(stem) => format!("{stem}.ro.sock"),
        None => format!("{name}.ro"),
    };
    Some(args.socket.with_file_name(ro))
}

/// `--check-config`: loads what a start or a SIGHUP would, says what it gives or why not.
fn check_config(args: &Args) -> Result<()> {
    let checked = load_config(args).and_then(|config| {
        let (settings, group) = load_settings(args, &config)?;
        config.auto_capture_settle(&args.config)?;
        Ok((settings, group, config))
    });
    match checked {
        Ok((settings, group, config)) => {
            let prefetch = vmar::prefetch::settings();
            println!(
                "{}: ok: image roots {:?}, max_targets {}, socket group {}, auto_capture {}, prefetch {:?}, record_after {}, prefetch_merge_gap {}",
                args.config.display(),
                settings.roots.roots(),
                settings.max_targets,
                group.map_or("none".to_string(), |g| g.to_string()),
                config.auto_capture,
                prefetch.mode,
                prefetch
                    .record_after
                    .map_or("never".to_string(), |d| format!("{} s", d.as_secs_f64())),
                prefetch.merge_gap
            );
            // vmard starts without them (their devices wait): said, not refused.
            for (root, why) in settings.roots.missing() {
                println!(
                    "{}: image root {} cannot be used now ({why}); vmard starts, and its devices wait for it",
                    args.config.display(),
                    root.display()
                );
            }
            Ok(())
        }
        Err(e) => {
            eprintln!(
                "vmard: {}: bad configuration, vmard would not load it: {e:#}",
                args.config.display()
            );
            std::process::exit(1);
        }
    }
}

/// With `WatchdogSec=` (WATCHDOG_USEC), pings systemd's watchdog at half the interval, each
/// time only after vmard answered a ping on its own socket: what is proven alive is the
/// server loop clients depend on, not merely a thread. A hung accept loop stops the pings
/// and systemd restarts vmard (devices are left as they are).
fn start_watchdog(socket: PathBuf) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let interval = std::time::Duration::from_micros(usec / 2);
    let spawned = std::thread::Builder::new()
        .name("vmard-watchdog".into())
        .spawn(move || {
            let client = vmar::client::Client::new(socket);
            loop {
                std::thread::sleep(interval);
                if vmar::shutdown::requested() {
                    return;
                }
                match client.call_raw(&vmar::protocol::Request::Ping, &mut |_| {}) {
                    // `busy` comes from the accept loop too: it is alive.
                    Ok(_) => {}
                    Err(vmar::Error::Remote { kind, .. }) if kind == "busy" => {}
                    Err(e) => {
                        tracing::error!("watchdog: vmard does not answer its own ping: {e}");
                        continue;
                    }
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the watchdog thread: {e}");
    }
}

/// Starts watching the image roots when `auto_capture` is on (read at start only; a root
/// missing at start is not watched until the next start).
fn start_auto_capture(
    args: &Args,
    config: &vmar::config::Config,
    socket: &std::path::Path,
    context: &Context,
) -> Result<()> {
    if !config.auto_capture {
        return Ok(());
    }
    let settle = config.auto_capture_settle(&args.config)?;
    let roots = context.settings().roots.roots().to_vec();
    vmar::watch::start(
        roots,
        socket.to_path_buf(),
        args.state_dir.clone(),
        settle,
        context.auto_capture().clone(),
    )
    .context("cannot start auto-capture")
}

/// Starts the image guard: images that live devices read are checked now, then on every
/// write fanotify reports and every `image_check_interval`; writes are refused unless
/// `refuse_image_writes = false` (read at start only).
fn start_guard(config: &vmar::config::Config, context: &Arc<Context>) -> Result<()> {
    let context = Arc::clone(context);
    vmar::guard::start(config.refuse_image_writes.unwrap_or(true), move |probe| {
        context.check_images(probe)
    })
    .context("cannot start the image guard")
}

/// Looks at the image roots every `interval` seconds: when one appears, goes or gets a file
/// system mounted on it, the roots are taken again and the devices still waiting for their
/// images are tried; they are also tried every ten intervals in any case.
fn start_retries(context: Arc<Context>, interval: u64) -> Result<()> {
    let interval = std::time::Duration::from_secs(interval.max(1));
    std::thread::Builder::new()
        .name("vmard-retry".into())
        .spawn(move || {
            let mut ticks = 0u64;
            while !vmar::shutdown::requested() {
                std::thread::sleep(interval);
                ticks += 1;
                let mut settings = context.settings();
                let now = vmar::roots::ImageRoots::resolve(settings.roots.configured());
                let changed = settings.roots.changed(&now);
                if changed {
                    tracing::info!(
                        usable = ?now.roots(),
                        missing = ?now.missing().iter().map(|(r, _)| r).collect::<Vec<_>>(),
                        "image roots changed"
                    );
                    settings.roots = now;
                    context.set_settings(settings);
                }
                if context.waiting().is_empty() {
                    if changed {
                        notify_status(&with_health(&context, "image roots changed".into()));
                    }
                    continue;
                }
                if changed || ticks.is_multiple_of(10) {
                    retry(
                        &context,
                        if changed {
                            "image roots changed"
                        } else {
                            "periodic"
                        },
                    );
                }
            }
        })
        .context("cannot start the retry thread")?;
    Ok(())
}

/// Tries the devices not restored yet again; logs what changed and updates the unit status.
fn retry(context: &Context, why: &str) {
    let before = context.waiting();
    if before.is_empty() {
        notify_status(&with_health(
            context,
            format!("{why}; all devices restored"),
        ));
        return;
    }
    match context.retry() {
        Ok(report) => {
            let done: Vec<_> = report
                .created
                .iter()
                .chain(&report.repaired)
                .chain(&report.unchanged)
                .collect();
            if !done.is_empty() {
                tracing::info!(devices = ?done, "{why}: waiting devices restored");
            }
            for (name, error) in &report.failed {
                // Logged again only when the reason changes.
                if before.get(name) != Some(error) {
                    tracing::error!(device = %name, "still cannot restore: {error}");
                }
            }
            notify_status(&with_health(
                context,
                format!("{why}: {} devices restored", done.len()),
            ));
        }
        Err(e) => tracing::error!("{why}: devices not restored: {e}"),
    }
}

/// `status` with what is still wrong: devices not restored (first, as DEGRADED:
/// `systemctl status` cuts long lines; whatever line replaces the last one keeps it while
/// they wait) and missing roots.
fn with_health(context: &Context, status: String) -> String {
    let missing = context.settings().roots.missing().len();
    let waiting = context.waiting();
    let mut line = String::new();
    if !waiting.is_empty() {
        let names: Vec<&str> = waiting.keys().map(String::as_str).collect();
        line.push_str(&format!(
            "DEGRADED: {} not restored ({}; `vmarctl list` or `vmarctl check` says why); ",
            names.len(),
            names.join(", ")
        ));
    }
    line.push_str(&status);
    if missing > 0 {
        line.push_str(&format!("; {missing} image roots missing"));
    }
    line
}

fn notify_status(status: &str) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(status)]);
}

/// SIGHUP: re-reads the configuration; a bad one is reported and the old one kept.
fn reload(args: &Args, context: &Context) {
    match load_config(args).and_then(|config| load_settings(args, &config)) {
        Ok((settings, _)) => {
            tracing::info!(
                roots = ?settings.roots.roots(),
                max_targets = settings.max_targets,
                "configuration reloaded (socket_group applies at the next start)"
            );
            context.set_settings(settings);
        }
        Err(e) => tracing::error!("configuration not reloaded, keeping the old one: {e:#}"),
    }
}

/// Removes `/dev/vmar` nodes that name no live vmar device of their name (see
/// [`vmar::device::nodes`]). Before the restore, so that no device it creates is meanwhile
/// given its node by udev; on a host without device-mapper there is nothing to look at.
fn remove_stale_nodes(context: &Context) {
    let Ok(kernel) = context.kernel() else {
        return;
    };
    let live = |name: &str| {
        Ok(kernel
            .dm_info(name)?
            .map(|d| nix::sys::stat::makedev(d.major.into(), d.minor.into())))
    };
    let removed = vmar::device::nodes::remove_stale(
        std::path::Path::new(vmar::device::nodes::NODE_DIR),
        live,
    );
    if !removed.is_empty() {
        tracing::warn!(
            nodes = ?removed,
            "removed /dev/vmar nodes that named no live vmar device of their name"
        );
    }
}

/// Restores the saved devices; returns a one-line status for systemd.
fn restore(context: &Context) -> String {
    match context.restore() {
        Ok(report) => {
            for (name, error) in &report.failed {
                tracing::error!(device = %name, "cannot restore: {error}");
            }
            tracing::info!(
                created = ?report.created,
                unchanged = ?report.unchanged,
                image_changed = ?report.image_changed,
                repaired = ?report.repaired,
                rolled_back = ?report.rolled_back,
                removed = ?report.removed,
                cleaned = ?report.cleaned,
                detached = ?report.detached,
                released = report.released.len(),
                failed = report.failed.len(),
                "devices restored"
            );
            format!(
                "{} devices created, {} unchanged, {} image-changed, {} repaired, {} failed, {} leftovers removed",
                report.created.len(),
                report.unchanged.len(),
                report.image_changed.len(),
                report.repaired.len(),
                report.failed.len(),
                report.cleaned.len() + report.rolled_back.len() + report.removed.len()
            )
        }
        Err(e) => {
            tracing::error!("devices not restored: {e}");
            format!("DEGRADED: devices not restored: {e}")
        }
    }
}
