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
    let opener: KernelOpener = match args.sim.clone() {
        Some(dir) => {
            let sim = SimKernel::open(&dir)?;
            // The simulated loop devices find deleted images through vmar's holds.
            sim.add_link_dir(&args.state_dir.join(vmar::holds::HOLDS_DIR))?;
            Box::new(move || Ok(Arc::new(Checked(sim.clone())) as Arc<dyn Kernel>))
        }
        None => Box::new(|| Ok(Arc::new(Checked(RealKernel::open()?)) as Arc<dyn Kernel>)),
    };
    let context = Context::new(catalog, settings, opener);
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

    start_auto_capture(&args, server.socket())?;
    vmar::service::hold_older_images(Arc::clone(server.context()));

    let stopper = server.stopper();
    let context = Arc::clone(server.context());
    std::thread::Builder::new()
        .name("vmard-signals".into())
        .spawn(move || {
            loop {
                match signals.wait() {
                    Ok(Signal::SIGHUP) => reload(&args, &context),
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
    let roots = vmar::roots::ImageRoots::new(&roots).context("bad image root")?;
    if roots.roots().is_empty() {
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

/// Starts watching the image roots when `auto_capture` is on (read at start only).
fn start_auto_capture(args: &Args, socket: &std::path::Path) -> Result<()> {
    let explicit = args.config.as_os_str() != vmar::config::DEFAULT_CONFIG;
    let config = vmar::config::Config::load(&args.config, explicit)?;
    if !config.auto_capture {
        return Ok(());
    }
    let settle = config.auto_capture_settle(&args.config)?;
    let mut roots = config.image_roots.clone();
    roots.extend(args.image_roots.iter().cloned());
    vmar::watch::start(roots, socket.to_path_buf(), args.state_dir.clone(), settle)
        .context("cannot start auto-capture")
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
