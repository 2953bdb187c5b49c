//! `capture`: images, or the images of a fleet manifest followed by this host's report.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::HumanBytes;
use serde::Serialize;
use vmar::error::ExitClass;
use vmar::name::ImageName;
use vmar::protocol::{CaptureResult, request};
use vmar::records::CaptureStatus;

use crate::context::{Ctx, Run};
use crate::output::{Usage, kind_of, print_json};

#[derive(Args, Debug)]
pub struct CaptureArgs {
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
}

impl Run for CaptureArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        if let Some(manifest) = &self.manifest {
            return capture_manifest(
                ctx,
                out,
                manifest,
                self.host.as_deref(),
                self.recapture,
                self.force_raw,
            );
        }
        if self.name.is_some() && self.images.len() > 1 {
            bail!(Usage(
                "--name applies to one image; capture the images one by one to name them".into()
            ));
        }
        let items: Vec<(PathBuf, Option<String>)> = self
            .images
            .iter()
            .map(|p| (p.clone(), self.name.clone()))
            .collect();
        let (class, outcomes) = capture(ctx, out, &items, self.recapture, self.force_raw)?;
        if ctx.json {
            print_json(out, &serde_json::json!({ "images": outcomes }))?;
        }
        Ok(class)
    }
}

/// Ctrl-C during a capture: say what becomes of it, then end as interrupted (130). Closing
/// the connection is what cancels it in vmard, at its next batch of blocks.
pub fn on_interrupt_of_capture() {
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

/// Captures `images` (path, name) one by one; a failure of one image is reported and the
/// others go on (the class is the first failure's), but a vmard that cannot be reached ends
/// it.
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
        let label = format!("capture {}", path.display());
        let captured = name
            .as_deref()
            .map(ImageName::new)
            .transpose()
            .and_then(|name| {
                let request = request::Capture {
                    path: absolute,
                    name,
                    recapture,
                    force_raw,
                };
                ctx.call_with_progress(request, &label)
            });
        let outcome = match captured {
            Ok(mut result) => {
                let rebuilt = if result.status == CaptureStatus::Recaptured {
                    std::iter::once(result.image.name.clone())
                        .chain(std::mem::take(&mut result.changed))
                        .collect()
                } else {
                    Vec::new()
                };
                if !ctx.json {
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
    let lines = crate::fleet::lines(ctx, &names)?;
    let dir = PathBuf::from(format!("{}.hosts", manifest.display()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let report = dir.join(&host);
    let tmp = dir.join(format!(".{host}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, vmar::fleet::format_report(&lines))
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &report))
        .with_context(|| format!("cannot write {}", report.display()))?;
    if ctx.json {
        print_json(
            out,
            &serde_json::json!({ "images": outcomes, "report": report, "host": host }),
        )?;
    } else {
        writeln!(out, "report of host {host}: {}", report.display())?;
    }
    Ok(class)
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
