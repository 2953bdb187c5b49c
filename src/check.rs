//! `vmarctl check`: one verdict for monitoring (Nagios' exit statuses 0 OK, 1 WARNING,
//! 2 CRITICAL) on whether vmar serves what it should. Every saved device must be active and
//! correct: live, resumed, its table the one its image's map gives now, and every image it
//! reads unchanged since capture. Any other state is a problem, whatever its name (states
//! added later included); a change in progress (`creating`, `removing` waiting for its last
//! user) is a warning. Every configured image root must be usable.

use std::collections::BTreeMap;

use crate::catalog::Catalog;
use crate::device::status_of;
use crate::error::Result;
use crate::instance::InstanceId;
use crate::kernel::Kernel;
use crate::protocol::{CheckReport, Problem, Severity};
use crate::roots::ImageRoots;

/// Checks every saved device and image root. `kernel` is `None` when device-mapper cannot
/// be opened; `waiting` says why devices were not restored (see
/// [`crate::service::Context::waiting`]).
pub fn check(
    catalog: &Catalog,
    kernel: Option<&dyn Kernel>,
    instance: &InstanceId,
    roots: &ImageRoots,
    max_targets: u64,
    waiting: &BTreeMap<String, String>,
) -> Result<CheckReport> {
    let mut problems = Vec::new();
    let devices = catalog.devices()?;
    let mut devices_ok = 0;
    for record in &devices {
        let name = &record.name;
        let found = match kernel {
            None => Some(Problem {
                severity: Severity::Critical,
                subject: format!("device {name}"),
                message: "device-mapper cannot be opened".into(),
            }),
            Some(kernel) => {
                let status = status_of(catalog, kernel, instance, name, max_targets, None)?;
                match state_problem(name, &status.state, waiting.get(name)) {
                    Some(problem) => Some(problem),
                    None => changed_image(catalog, name, &record.image),
                }
            }
        };
        match found {
            Some(problem) => problems.push(problem),
            None => devices_ok += 1,
        }
    }
    for (root, why) in roots.missing() {
        problems.push(Problem {
            severity: Severity::Warning,
            subject: format!("image root {}", root.display()),
            message: format!("cannot be used: {why}"),
        });
    }
    Ok(CheckReport {
        status: verdict(&problems),
        devices: devices.len() as u64,
        devices_ok,
        roots: roots.configured().len() as u64,
        roots_ok: (roots.configured().len() - roots.missing().len()) as u64,
        problems,
    })
}

/// The problem a device in `state` has, if any.
fn state_problem(name: &str, state: &str, waiting: Option<&String>) -> Option<Problem> {
    let (severity, message) = match state {
        // A deferred removal that completed: the record goes at the next change.
        "active" | "gone" => return None,
        "creating" => (Severity::Warning, "being created".to_string()),
        "removing" => (
            Severity::Warning,
            "being removed (waits for its last user to close it)".to_string(),
        ),
        "missing" => (
            Severity::Critical,
            match waiting {
                Some(why) => format!("not served: {why}"),
                None => "not served: not in the kernel".to_string(),
            },
        ),
        "suspended" => (Severity::Critical, "suspended: reads hang".to_string()),
        "differs" => (
            Severity::Critical,
            "its live table is not the one its image's map gives (`vmarctl refresh` it)"
                .to_string(),
        ),
        other => (Severity::Critical, format!("state {other}")),
    };
    Some(Problem {
        severity,
        subject: format!("device {name}"),
        message,
    })
}

/// A problem if an image the device reads changed since capture.
fn changed_image(catalog: &Catalog, name: &str, image: &str) -> Option<Problem> {
    let changed = (|| -> Result<()> {
        let (record, map) = catalog.map(image)?;
        for other in catalog.sources_of(&record, &map)?.values() {
            crate::holds::check_captured(catalog, other)?;
        }
        Ok(())
    })();
    changed.err().map(|e| Problem {
        severity: Severity::Critical,
        subject: format!("device {name}"),
        message: e.to_string(),
    })
}

/// The worst severity of `problems`.
pub fn verdict(problems: &[Problem]) -> Severity {
    problems
        .iter()
        .map(|p| p.severity)
        .max()
        .unwrap_or(Severity::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_but_active_is_a_problem() {
        assert_eq!(state_problem("web", "active", None), None);
        assert_eq!(state_problem("web", "gone", None), None);
        for state in ["creating", "removing"] {
            assert_eq!(
                state_problem("web", state, None).unwrap().severity,
                Severity::Warning
            );
        }
        // Including states this module does not know by name.
        for state in [
            "missing",
            "suspended",
            "differs",
            "no-table",
            "foreign",
            "image-changed",
        ] {
            let problem = state_problem("web", state, None).unwrap();
            assert_eq!(problem.severity, Severity::Critical, "{state}");
            assert_eq!(problem.subject, "device web");
        }
        let why = "image root /nfs missing".to_string();
        let problem = state_problem("web", "missing", Some(&why)).unwrap();
        assert!(problem.message.contains(&why), "{problem:?}");
    }

    #[test]
    fn the_verdict_is_the_worst_problem() {
        let problem = |severity| Problem {
            severity,
            subject: String::new(),
            message: String::new(),
        };
        assert_eq!(verdict(&[]), Severity::Ok);
        assert_eq!(verdict(&[problem(Severity::Warning)]), Severity::Warning);
        assert_eq!(
            verdict(&[
                problem(Severity::Warning),
                problem(Severity::Critical),
                problem(Severity::Warning)
            ]),
            Severity::Critical
        );
    }
}
