//! Fault injection for tests: named steps at which vmard fails a call or dies as if killed.
//!
//! The kernel seam, the catalog, capture and recovery call [`point`] before each step that
//! changes state. The steps are [`Step`], all of them in [`Step::ALL`], each with the name
//! the environment uses (`dm.load`, `catalog.commit`, ...). Nothing happens unless the
//! environment variable `VMAR_FAULTS` names the step, as `STEP[#N]=fail|kill|sleep:MS`
//! entries separated by commas: the N-th time (default: the first) the step is reached,
//! `fail` returns an error from it, `kill` sends the process SIGKILL, exactly like `kill -9`
//! between two system calls, and `sleep:MS` waits (holding a race window open). The fault
//! tests (tests/devices.rs) run every step this way, and one of them fails if a step of
//! [`Step::ALL`] is in none of their lists. `VMAR_FAULTS` is read once: vmard checks it at
//! start ([`init`]) and refuses an unknown step, naming the valid ones; with it unset this
//! costs one atomic load per step.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

/// Declares [`Step`] with the name of each step, once.
macro_rules! steps {
    ($($(#[$doc:meta])* $step:ident = $name:literal,)*) => {
        /// A step at which a fault can be injected (see the module doc).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Step {
            $($(#[$doc])* $step,)*
        }

        impl Step {
            /// Every step, in the order declared.
            pub const ALL: &'static [Step] = &[$(Step::$step,)*];

            /// The step's name in `VMAR_FAULTS`.
            pub fn name(self) -> &'static str {
                match self {
                    $(Step::$step => $name,)*
                }
            }
        }
    };
}

steps! {
    /// Creating a dm device (create, restore).
    DmCreate = "dm.create",
    /// Loading a table into a dm device's inactive slot.
    DmLoad = "dm.load",
    /// Suspending a dm device (the swap of a refresh or restore).
    DmSuspend = "dm.suspend",
    /// Resuming a dm device.
    DmResume = "dm.resume",
    /// Dropping the inactive table of a dm device (a restore finishing an interrupted swap
    /// to the same table, a failed swap).
    DmClear = "dm.clear",
    /// Removing a dm device.
    DmRemove = "dm.remove",
    /// Creating a device's dm-stats region.
    DmStats = "dm.stats",
    /// Attaching an image to a loop device.
    LoopAttach = "loop.attach",
    /// Detaching a loop device a crash leaked (restore).
    LoopDetach = "loop.detach",
    /// The catalog's transaction at open (its tables created, older schemas migrated).
    CatalogInit = "catalog.init",
    /// Committing a catalog change.
    CatalogCommit = "catalog.commit",
    /// A capture's batch of blocks hashed.
    CaptureBatch = "capture.batch",
    /// A capture whose image is hashed, before it is recorded.
    CaptureHashed = "capture.hashed",
    /// Writing a content index run.
    IndexWrite = "index.write",
    /// Writing an image's digest list.
    DigestsWrite = "digests.write",
    /// `--recover`: the new catalog built aside.
    RecoverStaged = "recover.staged",
    /// `--recover`: the swap decided (marker written).
    RecoverMarked = "recover.marked",
    /// `--recover`: an old file moved aside.
    RecoverAside = "recover.aside",
    /// `--recover`: a new file moved in.
    RecoverSwap = "recover.swap",
    /// `--recover`: every file swapped.
    RecoverSwapped = "recover.swapped",
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Step {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Step, String> {
        Step::ALL
            .iter()
            .copied()
            .find(|step| step.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Step::ALL.iter().map(|s| s.name()).collect();
                format!(
                    "unknown fault step {name:?}; the steps are: {}",
                    names.join(", ")
                )
            })
    }
}

/// What happens at a faulty step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Fail,
    Kill,
    /// Wait this many milliseconds, then go on: holds a race window open for a test.
    Sleep(u64),
}

/// The faults of a `VMAR_FAULTS` value: step -> (hit number, action).
pub type Faults = HashMap<Step, (u32, Action)>;

#[derive(Debug, Default)]
struct Plan {
    faults: Faults,
    hits: HashMap<Step, u32>,
}

/// The parsed `VMAR_FAULTS`: `Ok(None)` when unset, the parse error when it is malformed.
fn plan() -> &'static std::result::Result<Option<Mutex<Plan>>, String> {
    static PLAN: OnceLock<std::result::Result<Option<Mutex<Plan>>, String>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let Ok(spec) = std::env::var("VMAR_FAULTS") else {
            return Ok(None);
        };
        let faults = parse(&spec)?;
        Ok(Some(Mutex::new(Plan {
            faults,
            hits: HashMap::new(),
        })))
    })
}

/// Reads `VMAR_FAULTS` (once): an error says what is wrong with it, an unknown step with the
/// list of valid ones. vmard calls it at start, so a misspelt step stops it instead of
/// injecting nothing.
pub fn init() -> Result<()> {
    plan()
        .as_ref()
        .map(|_| ())
        .map_err(|message| Error::Config {
            path: "VMAR_FAULTS".into(),
            message: message.clone(),
        })
}

/// Parses a `VMAR_FAULTS` value.
pub fn parse(spec: &str) -> std::result::Result<Faults, String> {
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
        let step: Step = step.parse().map_err(|e| format!("{entry:?}: {e}"))?;
        faults.insert(step, (nth, action));
    }
    Ok(faults)
}

/// Marks that the process reaches `step`; fails or dies there if `VMAR_FAULTS` says so.
pub fn point(step: Step) -> Result<()> {
    let plan = match plan() {
        Ok(Some(plan)) => plan,
        Ok(None) => return Ok(()),
        Err(e) => {
            // Only where [`init`] was not called first (vmard calls it).
            tracing::error!("ignoring VMAR_FAULTS: {e}");
            return Ok(());
        }
    };
    let mut plan = plan.lock().unwrap_or_else(|p| p.into_inner());
    let hits = plan.hits.entry(step).or_insert(0);
    *hits += 1;
    let hits = *hits;
    match plan.faults.get(&step) {
        Some(&(nth, action)) if nth == hits => match action {
            Action::Fail => Err(Error::Injected { step: step.name() }),
            Action::Sleep(ms) => {
                drop(plan);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(())
            }
            Action::Kill => {
                tracing::warn!(step = step.name(), "VMAR_FAULTS: killing vmard here");
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
        assert_eq!(f[&Step::DmLoad], (1, Action::Fail));
        assert_eq!(f[&Step::CatalogCommit], (3, Action::Kill));
        let sleep = parse("capture.hashed=sleep:250").unwrap();
        assert_eq!(sleep[&Step::CaptureHashed], (1, Action::Sleep(250)));
        for bad in [
            "dm.load",
            "dm.load=explode",
            "dm.load#0=fail",
            "dm.load#y=kill",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn an_unknown_step_is_refused_with_the_valid_ones() {
        let err = parse("dm.lod=fail").unwrap_err();
        assert!(err.contains("\"dm.lod\""), "{err}");
        for step in Step::ALL {
            assert!(err.contains(step.name()), "{err} does not name {step}");
        }
    }

    #[test]
    fn every_step_has_one_name_that_parses_back() {
        let mut names = std::collections::BTreeSet::new();
        for step in Step::ALL {
            assert_eq!(step.name().parse::<Step>(), Ok(*step));
            assert!(names.insert(step.name()), "{step} named twice");
        }
    }

    /// docs/guarantees.md lists the steps a crash is tested at: all of them.
    #[test]
    fn the_guarantees_name_every_step() {
        let doc = include_str!("../docs/guarantees.md");
        let (listed, _) = doc
            .split_once("| promise |")
            .expect("guarantees.md has its table");
        for step in Step::ALL {
            assert!(
                listed.contains(&format!("`{step}`")),
                "docs/guarantees.md does not list the fault step {step}"
            );
        }
    }
}
