//! Monitoring: `ping`, `check` (a Nagios plugin), `metrics` (Prometheus) and
//! `restore-status`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use vmar::client::Client;
use vmar::error::ExitClass;
use vmar::protocol::{CheckReport, Severity, request};

use crate::context::{Ctx, Run};
use crate::output::{kind_of, print_error_json, print_json};

pub fn ping(ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
    let pong = ctx.call(request::Ping)?;
    if ctx.json {
        // `version` is the document's: vmard's own goes under "vmard".
        print_json(out, &serde_json::json!({ "vmard": pong }))?;
        return Ok(ExitClass::Success);
    }
    writeln!(
        out,
        "vmard {} (protocol {}) at {}, state in {}",
        pong.version,
        pong.protocol,
        ctx.socket.display(),
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
    Ok(ExitClass::Success)
}

/// `vmarctl check`: Nagios' exit status, 3 (UNKNOWN) when vmard cannot be asked.
pub fn check(socket: &Path, json: bool) -> ExitCode {
    let client = Client::new(socket);
    let mut out = std::io::stdout().lock();
    let report = match client.call(request::Check, &mut |_| {}) {
        Ok(report) => report,
        Err(e) => {
            if json {
                print_error_json(&kind_of(&e), &e.to_string());
            } else {
                let _ = writeln!(out, "VMAR UNKNOWN - cannot ask vmard: {e}");
            }
            return ExitCode::from(Severity::Unknown as u8);
        }
    };
    let printed = if json {
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

#[derive(Args, Debug)]
pub struct MetricsArgs {
    /// Write them to FILE atomically (a temporary file renamed over it), as
    /// node_exporter's textfile collector needs; when vmard does not answer, FILE gets
    /// `vmar_up 0` and vmarctl exits 6.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
}

impl Run for MetricsArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let result = ctx.call(request::Metrics);
        let Some(path) = self.output.as_deref() else {
            let result = result?;
            if ctx.json {
                print_json(out, &result)?;
            } else {
                out.write_all(result.text.as_bytes())?;
            }
            return Ok(ExitClass::Success);
        };
        let (text, failure) = match result {
            Ok(result) => (result.text, None),
            Err(e) => (vmar::metrics::unreachable(), Some(e)),
        };
        write_atomically(path, text.as_bytes())?;
        if let Some(e) = failure {
            return Err(e.context(format!("{} says vmar_up 0", path.display())));
        }
        Ok(ExitClass::Success)
    }
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

pub fn restore_status(ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
    let status = ctx.call(request::RestoreStatus)?;
    ctx.show(out, &status, |out, s| {
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
