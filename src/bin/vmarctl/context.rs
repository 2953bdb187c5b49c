//! What every subcommand gets: the connection to vmard, whether to print JSON, and progress
//! of long requests on stderr.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde::Serialize;
use vmar::client::Client;
use vmar::error::ExitClass;
use vmar::protocol::{Call, ImagesResult, Progress, request};

use crate::output::print_json;

/// A subcommand: its parsed arguments, carried out with [`Ctx`], printing on `out`.
pub trait Run {
    /// Carries the subcommand out; the class is the exit status of a run that printed what
    /// it should (e.g. `verify` of a mismatch: [`ExitClass::CheckFailed`]).
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass>;
}

/// What every command gets.
pub struct Ctx<'a> {
    /// `--json`: print one JSON document instead of text.
    pub json: bool,
    /// vmard's socket (`--socket`).
    pub socket: &'a Path,
    pub client: Client,
}

impl Ctx<'_> {
    /// Sends `request`; the result is of the type vmard answers that request with.
    pub fn call<C: Call>(&self, request: C) -> Result<C::Reply> {
        Ok(self.client.call(request, &mut |_| {})?)
    }

    /// A request with progress on stderr.
    pub fn call_with_progress<C: Call>(&self, request: C, label: &str) -> vmar::Result<C::Reply> {
        let mut reporter = Reporter::new(self.json, label);
        let result = self.client.call(request, &mut |p| reporter.update(p));
        reporter.finish();
        result
    }

    pub fn images(&self) -> Result<ImagesResult> {
        self.call(request::Images)
    }

    /// Prints `value` as a versioned JSON document with `--json`, else as `text` words it.
    pub fn show<T: Serialize>(
        &self,
        out: &mut dyn Write,
        value: &T,
        text: impl FnOnce(&mut dyn Write, &T) -> Result<()>,
    ) -> Result<()> {
        if self.json {
            print_json(out, value)
        } else {
            text(out, value)
        }
    }
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
    fn new(json: bool, label: &str) -> Reporter {
        if std::io::stderr().is_terminal() && !json {
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

/// A device argument: `NAME`, `/dev/vmar/NAME` or `/dev/mapper/vmar-NAME`.
pub fn device_arg(argument: &str) -> Result<String, String> {
    Ok(vmar::kernel::device_name(argument).to_string())
}
