//! vmard: the vmar daemon. Owns the catalog and answers vmarctl over a local socket.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Group;
use vmar::catalog::Catalog;
use vmar::kernel::{Checked, Kernel, real::RealKernel, sim::SimKernel};
use vmar::protocol::DEFAULT_SOCKET;
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

    /// Configuration file (image_roots, socket_group, max_targets, auto_capture); options
    /// override it.
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
    /// what is left is moved aside, the images are captured again in their original order
    /// and their devices saved again; then vmard starts as usual.
    #[arg(long)]
    recover: bool,

    /// Run on a simulated kernel whose state lives in DIR instead of the real one (tests,
    /// trying vmar without root).
    #[arg(long, value_name = "DIR")]
    sim: Option<PathBuf>,

    /// Print this manual page (roff) and exit; `make install` uses it.
    #[arg(long, hide = true)]
    man: bool,

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
        let command = <Args as clap::CommandFactory>::command();
        clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
        return Ok(());
    }
    // Signals are taken by one thread with sigwait: block them before any thread starts.
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals.thread_block().context("cannot block signals")?;

    let (settings, group) = load_settings(&args)?;
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
    let instance = vmar::instance::InstanceId::load_or_create(&args.state_dir)
        .context("cannot read the state dir's instance id")?;
    let opener: KernelOpener = match args.sim.clone() {
        Some(dir) => {
            let sim = SimKernel::open(&dir)?;
            Box::new(move || Ok(Arc::new(Checked(sim.clone())) as Arc<dyn Kernel>))
        }
        None => Box::new(|| Ok(Arc::new(Checked(RealKernel::open()?)) as Arc<dyn Kernel>)),
    };
    let context = Context::new(catalog, instance, settings, opener);
    let server =
        Server::bind(context, &args.socket, Access { group }).context("cannot start vmard")?;
    // Restore saved devices before reporting ready, so that units ordered after vmard (VMs)
    // find their devices. A device that cannot be served is reported and skipped. Clients
    // that connect meanwhile wait in the socket's backlog.
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
    tracing::info!(
        socket = %server.socket().display(),
        state_dir = %args.state_dir.display(),
        %status,
        "vmard ready"
    );

    start_auto_capture(&args, server.socket(), server.context())?;
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
    // Dropping the server closes the catalog cleanly; devices stay as they are.
    drop(server);
    tracing::info!("vmard stopped; catalog closed, devices left running");
    Ok(())
}

/// Settings and socket group from the configuration file and the options.
fn load_settings(args: &Args) -> Result<(Settings, Option<nix::unistd::Gid>)> {
    // The default file may be absent; one named explicitly must exist.
    let explicit = args.config.as_os_str() != vmar::config::DEFAULT_CONFIG;
    let config = vmar::config::Config::load(&args.config, explicit)?;
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
    Ok((Settings { max_targets, roots }, group))
}

/// Starts watching the image roots when `auto_capture` is on (read at start only; a root
/// missing at start is not watched until the next start).
fn start_auto_capture(args: &Args, socket: &std::path::Path, context: &Context) -> Result<()> {
    let explicit = args.config.as_os_str() != vmar::config::DEFAULT_CONFIG;
    let config = vmar::config::Config::load(&args.config, explicit)?;
    if !config.auto_capture {
        return Ok(());
    }
    let settle = config.auto_capture_settle(&args.config)?;
    let roots = context.settings().roots.roots().to_vec();
    vmar::watch::start(roots, socket.to_path_buf(), settle).context("cannot start auto-capture")
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

/// `status` with what is still wrong: missing roots and devices waiting for their images.
fn with_health(context: &Context, status: String) -> String {
    let missing = context.settings().roots.missing().len();
    let waiting = context.waiting().len();
    let mut status = status;
    if missing > 0 {
        status.push_str(&format!("; {missing} image roots missing"));
    }
    if waiting > 0 {
        status.push_str(&format!(
            "; {waiting} devices waiting for their images (vmarctl check)"
        ));
    }
    status
}

fn notify_status(status: &str) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(status)]);
}

/// SIGHUP: re-reads the configuration; a bad one is reported and the old one kept.
fn reload(args: &Args, context: &Context) {
    match load_settings(args) {
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
                "{} devices created, {} unchanged, {} repaired, {} failed, {} leftovers removed",
                report.created.len(),
                report.unchanged.len(),
                report.repaired.len(),
                report.failed.len(),
                report.cleaned.len() + report.rolled_back.len() + report.removed.len()
            )
        }
        Err(e) => {
            tracing::error!("devices not restored: {e}");
            format!("devices not restored: {e}")
        }
    }
}
