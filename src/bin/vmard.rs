//! vmard: the vmar daemon. Owns the catalog and answers vmarctl over a local socket.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use nix::unistd::Group;
use vmar::server::{Access, DEFAULT_SOCKET, DEFAULT_STATE_DIR, Server};

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

    /// Configuration file (image_roots, socket_group, max_targets); options override it.
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

    /// Print this manual page (roff) and exit; `make install` uses it.
    #[arg(long, hide = true)]
    man: bool,

    /// Group whose members may use the socket besides root (socket mode 0660).
    #[arg(long, env = "VMAR_SOCKET_GROUP")]
    socket_group: Option<String>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMAR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if args.man {
        let command = <Args as clap::CommandFactory>::command();
        clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
        return Ok(());
    }
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
    let server = Server::bind(
        &args.state_dir,
        &args.socket,
        Access { group },
        max_targets,
        roots,
    )
    .context("cannot start vmard")?;
    // Restore saved devices before reporting ready, so that units ordered after vmard (VMs)
    // find their devices. A device that cannot be served is reported and skipped. Clients
    // that connect meanwhile wait in the socket's backlog.
    let status = if args.no_restore {
        "devices not restored (--no-restore)".to_string()
    } else {
        restore(&server, max_targets)
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
    server.run().context("vmard stopped")
}

/// Restores the saved devices; returns a one-line status for systemd.
fn restore(server: &Server, max_targets: u64) -> String {
    match vmar::device::restore(server.catalog(), max_targets) {
        Ok(report) => {
            for (name, error) in &report.failed {
                tracing::error!(device = %name, "cannot restore: {error}");
            }
            tracing::info!(
                created = ?report.created,
                unchanged = ?report.unchanged,
                differs = ?report.differs,
                cleaned = ?report.cleaned,
                failed = report.failed.len(),
                "devices restored"
            );
            format!(
                "{} devices created, {} unchanged, {} differ, {} failed, {} leftovers removed",
                report.created.len(),
                report.unchanged.len(),
                report.differs.len(),
                report.failed.len(),
                report.cleaned.len()
            )
        }
        Err(e) => {
            tracing::error!("devices not restored: {e}");
            format!("devices not restored: {e}")
        }
    }
}
