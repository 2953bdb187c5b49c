//! Fault injection for tests: named steps at which vmard fails a call or dies as if killed.
//!
//! The kernel seam and the catalog call [`point`] before each step that changes state
//! (`dm.create`, `dm.load`, `dm.suspend`, `dm.resume`, `dm.remove`, `loop.attach`,
//! `catalog.commit`, `index.write`, ...). Nothing happens unless the environment variable
//! `VMAR_FAULTS` names the step, as `STEP[#N]=fail|kill|sleep:MS` entries separated by
//! commas: the N-th time (default: the first) the step is reached, `fail` returns an error
//! from it, `kill` sends the process SIGKILL, exactly like `kill -9` between two system
//! calls, and `sleep:MS` waits (holding a race window open). The
//! fault matrix in the tests runs every step of every operation this way. `VMAR_FAULTS` is
//! read once, at the first step; with it unset this costs one atomic load per step.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

/// What happens at a faulty step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Fail,
    Kill,
    /// Wait this many milliseconds, then go on: holds a race window open for a test.
    Sleep(u64),
}

#[derive(Debug, Default)]
struct Plan {
    /// step -> (hit number, action)
    faults: HashMap<String, (u32, Action)>,
    hits: HashMap<String, u32>,
}

fn plan() -> &'static Option<Mutex<Plan>> {
    static PLAN: OnceLock<Option<Mutex<Plan>>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let spec = std::env::var("VMAR_FAULTS").ok()?;
        match parse(&spec) {
            Ok(faults) => Some(Mutex::new(Plan {
                faults,
                hits: HashMap::new(),
            })),
            Err(e) => {
                tracing::error!("ignoring VMAR_FAULTS: {e}");
                None
            }
        }
    })
}

/// Parses a `VMAR_FAULTS` value.
pub fn parse(spec: &str) -> std::result::Result<HashMap<String, (u32, Action)>, String> {
    let mut faults = HashMap::new();
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (step, action) = entry
            .split_once('=')
            .ok_or_else(|| format!("{entry:?}: expected STEP[#N]=fail|kill|sleep:MS"))?;
        let action = match action {
            "fail" => Action::Fail,
            "kill" => Action::Kill,
            other => match other.strip_prefix("sleep:").map(str::parse) {
                Some(Ok(ms)) => Action::Sleep(ms),
                _ => return Err(format!("{entry:?}: unknown action {other:?}")),
            },
        };
        let (step, nth) = match step.split_once('#') {
            Some((step, n)) => (
                step,
                n.parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{entry:?}: bad count {n:?}"))?,
            ),
            None => (step, 1),
        };
        faults.insert(step.to_string(), (nth, action));
    }
    Ok(faults)
}

/// Marks that the process reaches `step`; fails or dies there if `VMAR_FAULTS` says so.
pub fn point(step: &str) -> Result<()> {
    let Some(plan) = plan() else {
        return Ok(());
    };
    let mut plan = plan.lock().unwrap_or_else(|p| p.into_inner());
    let hits = plan.hits.entry(step.to_string()).or_insert(0);
    *hits += 1;
    let hits = *hits;
    match plan.faults.get(step) {
        Some(&(nth, action)) if nth == hits => match action {
            Action::Fail => Err(Error::Injected {
                step: step.to_string(),
            }),
            Action::Sleep(ms) => {
                drop(plan);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(())
            }
            Action::Kill => {
                tracing::warn!(step, "VMAR_FAULTS: killing vmard here");
                let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::SIGKILL);
                // SIGKILL cannot be caught; this is not reached.
                std::process::abort()
            }
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let f = parse("dm.load=fail, catalog.commit#3=kill").unwrap();
        assert_eq!(f["dm.load"], (1, Action::Fail));
        assert_eq!(f["catalog.commit"], (3, Action::Kill));
        let sleep = parse("capture.hashed=sleep:250").unwrap();
        assert_eq!(sleep["capture.hashed"], (1, Action::Sleep(250)));
        for bad in ["dm.load", "dm.load=explode", "x#0=fail", "x#y=kill"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("").unwrap().is_empty());
    }
}
