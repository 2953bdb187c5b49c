//! The device lifecycle on the in-memory kernel (`vmard --sim`), without root or a guest:
//! create, refresh, remove, list, status, stats and restore through the socket, every
//! outcome of restore and remove, a fault (error or kill) at every step of every device and
//! catalog change, and concurrent changes of one name. After each scenario the same
//! invariants are checked: no device suspended, every live device serves byte for byte the
//! image its record names, record and kernel agree, no loop device leaked.

mod common;

use std::path::{Path, PathBuf};

use common::{
    Block, Daemon, alias_node, capture_all, device_states, err, family_blocks, family_paths, ok, s,
    write_image,
};
use serde_json::Value;
use vmar::fault::Step;
use vmar::kernel::sim::SimKernel;

/// Images sharing blocks: holes, zeros, shared and unique blocks, a partial last block.
fn family(dir: &Path) -> Vec<PathBuf> {
    let [base, web, db] = family_blocks();
    let paths = family_paths(dir);
    write_image(&paths[0], &base, 0);
    write_image(&paths[1], &web, 0);
    write_image(&paths[2], &db, 1536);
    paths
}

/// The dm UUID vmard of state dir `dir/state` gives device `name`.
fn own_uuid(dir: &Path, name: &str) -> String {
    let id = std::fs::read_to_string(dir.join("state/instance-id")).unwrap();
    format!("VMAR-{}-{name}", id.trim())
}

fn sim(dir: &Path) -> SimKernel {
    SimKernel::open(&dir.join("kernel")).unwrap()
}

/// The invariants every scenario must end in (see the module doc).
fn check_invariants(dir: &Path, daemon: &Daemon) {
    let kernel = sim(dir);
    let state = kernel.state().unwrap();
    let images: Vec<Value> = ok(daemon, &["images"])["images"]
        .as_array()
        .unwrap()
        .clone();
    let path_of = |name: &str| -> PathBuf {
        let image = images
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("no image {name}"));
        PathBuf::from(image["path"].as_str().unwrap())
    };
    for (name, st) in device_states(daemon) {
        assert!(
            st == "active" || st == "removing",
            "device {name} is {st} after the scenario"
        );
    }
    for (name, device) in &state.devices {
        assert!(!device.suspended, "device {name} left suspended");
        let status = ok(daemon, &["status", name]);
        let image = status["image"].as_str().unwrap_or_else(|| {
            panic!("live device {name} has no record: {status}");
        });
        let want = std::fs::read(path_of(image)).unwrap();
        let got = kernel.read_device(name).unwrap();
        assert!(got == want, "device {name} does not serve image {image}");
    }
    for (name, st) in device_states(daemon) {
        assert!(
            state.devices.contains_key(&name),
            "{name} is {st} but not live"
        );
    }
    for (minor, l) in &state.loops {
        let used = state.devices.values().any(|d| {
            d.active.iter().flatten().any(|t| {
                t.linear_source()
                    .is_some_and(|(dev, _)| dev.to_string() == format!("7:{minor}"))
            })
        });
        assert!(used, "loop{minor} over {} is leaked", l.backing.display());
    }
}

#[test]
fn devices_serve_their_images_and_go_away_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images);
    for name in ["base", "web", "db"] {
        let out = ok(&daemon, &["create", name, name]);
        assert_eq!(out["device"]["state"], "active", "{out}");
    }
    assert_eq!(err(&daemon, &["create", "web", "web"]), "device-exists");
    let kernel = sim(dir.path());
    for (name, image) in ["base", "web", "db"].iter().zip(&images) {
        assert_eq!(
            kernel.read_device(name).unwrap(),
            std::fs::read(image).unwrap()
        );
    }
    assert!(
        kernel.write("web", 0, &[0; 512]).is_err(),
        "writes must be refused"
    );
    // One loop device per image file, shared by all devices.
    let state = kernel.state().unwrap();
    assert_eq!(state.loops.len(), 3, "{:?}", state.loops);
    check_invariants(dir.path(), &daemon);
    // Stats: two full reads of web (above and in the check) are attributed to its
    // classes, and add up.
    let stats = ok(&daemon, &["stats", "web"]);
    assert_eq!(
        stats["devices"][0]["read"]["total"],
        2 * std::fs::metadata(&images[1]).unwrap().len(),
        "{stats}"
    );
    let by = &stats["devices"][0]["read"]["by_class"];
    assert_eq!(
        by["own"].as_u64().unwrap()
            + by["redirected"].as_u64().unwrap()
            + by["zero"].as_u64().unwrap(),
        stats["devices"][0]["read"]["total"].as_u64().unwrap()
    );
    assert!(by["redirected"].as_u64().unwrap() > 0, "{stats}");
    assert!(by["own"].as_u64().unwrap() > 0, "{stats}");
    for name in ["base", "web", "db"] {
        ok(&daemon, &["remove", name]);
    }
    assert_eq!(ok(&daemon, &["list"]), serde_json::json!([]));
    let state = kernel.state().unwrap();
    assert!(
        state.devices.is_empty() && state.loops.is_empty(),
        "{state:?}"
    );
    assert_eq!(err(&daemon, &["remove", "web"]), "unknown-device");
}

/// Host loop devices over image files, detached when dropped: images that are block devices.
struct HostLoops(Vec<String>);

impl HostLoops {
    /// Attaches each of `files` read-only; `None` (skip) without root or loop devices.
    fn attach(files: &[PathBuf]) -> Option<HostLoops> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for loop devices as block-device images");
            return None;
        }
        let mut loops = HostLoops(Vec::new());
        for file in files {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show", "--read-only"])
                .arg(file)
                .output()
                .ok()?;
            if !out.status.success() {
                eprintln!(
                    "skipped: no loop device: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                return None;
            }
            loops
                .0
                .push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        Some(loops)
    }
}

impl Drop for HostLoops {
    fn drop(&mut self) {
        for node in &self.0 {
            let _ = std::process::Command::new("losetup")
                .args(["-d", node])
                .status();
        }
    }
}

/// Images on block devices go through buffered loop devices like files (so reads share the
/// block device's page cache), one loop device per block device whichever node names it:
/// here the device is captured through a node in the image root, and a loop device someone
/// attached through the device's /dev node is found and reused by device number.
#[test]
fn block_device_images_get_one_loop_device_each_whatever_node_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let files = family(dir.path());
    let Some(host) = HostLoops::attach(&files[..2]) else {
        return;
    };
    let nodes: Vec<PathBuf> = ["base.dev", "web.dev"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    for (host_node, node) in host.0.iter().zip(&nodes) {
        alias_node(Path::new(host_node), node);
    }
    let kernel = sim(dir.path());
    // Attached (autoclear, held by this process) through the /dev node, not the captured one.
    let planted = kernel.plant_loop(Path::new(&host.0[1]), true).unwrap();
    let daemon = Daemon::start_sim(dir.path(), "");
    for (node, name) in nodes.iter().zip(["base", "web"]) {
        ok(&daemon, &["capture", s(node), "--name", name]);
        // A block device cannot be held (deleting a node frees nothing), and images says so.
        let file = file_of(&daemon, name);
        assert!(file["hold"].is_null(), "{file}");
        assert!(
            file["not_held"].as_str().unwrap().contains("block device"),
            "{file}"
        );
    }
    for (name, image) in [("base", "base"), ("web", "web"), ("web2", "web")] {
        let out = ok(&daemon, &["create", name, image]);
        assert_eq!(out["device"]["state"], "active", "{out}");
    }
    for (name, file) in [("base", &files[0]), ("web", &files[1]), ("web2", &files[1])] {
        assert!(
            kernel.read_device(name).unwrap() == std::fs::read(file).unwrap(),
            "{name} does not serve {}",
            file.display()
        );
    }
    let state = kernel.state().unwrap();
    let by_device: Vec<Option<(u32, u32)>> = state.loops.values().map(|l| l.rdev).collect();
    assert_eq!(
        state.loops.len(),
        2,
        "one loop device per block device: {state:?}"
    );
    assert!(by_device.iter().all(Option::is_some), "{by_device:?}");
    assert_ne!(by_device[0], by_device[1], "{by_device:?}");
    let planted_dev = format!("7:{planted}");
    for name in ["web", "web2"] {
        let status = ok(&daemon, &["status", name]);
        assert_eq!(status["state"], "active", "{status}");
        let reads: Vec<&str> = status["reads_from"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            reads.contains(&planted_dev.as_str()),
            "{name} reads {reads:?}, not {planted_dev}"
        );
    }
    check_invariants(dir.path(), &daemon);
    // Page-cache figures are of the block devices, sized as devices (st_size is 0).
    let stats = ok(&daemon, &["stats"]);
    let sizes: Vec<u64> = stats["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["size"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = files[..2]
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .collect();
    assert_eq!(sizes, want, "{stats}");
    // A restart finds the loop devices again and leaves the devices alone.
    let state_dir = daemon.stop();
    let daemon = Daemon::start_sim(dir.path(), "");
    assert_eq!(state_dir, daemon.state);
    assert_eq!(kernel.state().unwrap().loops.len(), 2);
    for name in ["base", "web", "web2"] {
        assert_eq!(ok(&daemon, &["status", name])["state"], "active");
        ok(&daemon, &["remove", name]);
    }
    drop(host);
}

#[test]
fn open_devices_are_removed_only_deferred() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images);
    ok(&daemon, &["create", "web", "web"]);
    let kernel = sim(dir.path());
    kernel.open_device("web").unwrap();
    assert_eq!(err(&daemon, &["remove", "web"]), "device-busy");
    assert_eq!(
        device_states(&daemon),
        [("web".to_string(), "active".to_string())]
    );
    let out = ok(&daemon, &["remove", "web", "--deferred"]);
    assert_eq!(out["deferred"], true, "{out}");
    assert_eq!(
        device_states(&daemon),
        [("web".to_string(), "removing".to_string())]
    );
    // Still served while open; the name is not free yet.
    assert_eq!(
        kernel.read_device("web").unwrap(),
        std::fs::read(&images[1]).unwrap()
    );
    assert_eq!(err(&daemon, &["create", "web", "web"]), "device-exists");
    kernel.close_device("web").unwrap();
    assert_eq!(ok(&daemon, &["list"]), serde_json::json!([]));
    assert!(kernel.state().unwrap().loops.is_empty());
    // The name is free again, and the images are no longer in use.
    ok(&daemon, &["create", "web", "web"]);
    ok(&daemon, &["remove", "web"]);
    ok(&daemon, &["forget", "db"]);
}

#[test]
fn refresh_swaps_the_table_of_an_open_device() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_args(
        dir.path(),
        &dir.path().join("state"),
        &dir.path().join("run/vmard.sock"),
        &["--sim", s(&dir.path().join("kernel")), "--max-targets", "4"],
    );
    capture_all(&daemon, &images);
    let created = ok(&daemon, &["create", "db", "db"]);
    assert!(created["targets"].as_u64().unwrap() <= 4, "{created}");
    drop(daemon);
    let kernel = sim(dir.path());
    kernel.open_device("db").unwrap();
    let daemon = Daemon::start_args(
        dir.path(),
        &dir.path().join("state"),
        &dir.path().join("run/vmard.sock"),
        &["--sim", s(&dir.path().join("kernel")), "--no-restore"],
    );
    assert_eq!(
        device_states(&daemon),
        [("db".to_string(), "differs".to_string())]
    );
    let out = ok(&daemon, &["refresh", "db"]);
    assert!(out["targets"].as_u64().unwrap() > 4, "{out}");
    assert_eq!(
        device_states(&daemon),
        [("db".to_string(), "active".to_string())]
    );
    assert_eq!(
        kernel.read_device("db").unwrap(),
        std::fs::read(&images[2]).unwrap()
    );
    kernel.close_device("db").unwrap();
    check_invariants(dir.path(), &daemon);
}

#[test]
fn restore_repairs_every_kind_of_leftover() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images);
    for name in ["base", "web", "db"] {
        ok(&daemon, &["create", name, name]);
    }
    drop(daemon);
    let kernel = sim(dir.path());
    use vmar::kernel::Kernel;
    // web: suspended with its own table loaded, as a crash between suspend and resume of a
    // refresh leaves it, with a reader waiting.
    let table = kernel.dm_table("web").unwrap();
    kernel.dm_load("web", &table).unwrap();
    kernel.dm_suspend("web").unwrap();
    kernel.open_device("web").unwrap();
    assert!(
        kernel.read("web", 0, 4096).is_err(),
        "a suspended device must not serve"
    );
    // db: gone from the kernel (a reboot).
    kernel.dm_remove("db", false).unwrap();
    // A leftover device the catalog does not know, and a loop device without autoclear
    // over a captured image (a crash between LOOP_SET_FD and LOOP_SET_STATUS64).
    kernel
        .dm_create("stray", &own_uuid(dir.path(), "stray"))
        .unwrap();
    let leaked = kernel.plant_loop(&images[2], false).unwrap();
    // A writable loop device someone else made over a captured image is not vmar's leftover.
    let theirs = kernel.plant_loop_as(&images[2], false, false).unwrap();
    let daemon = Daemon::start_sim(dir.path(), "");
    let mut got = device_states(&daemon);
    got.sort();
    assert_eq!(
        got,
        [
            ("base".to_string(), "active".to_string()),
            ("db".to_string(), "active".to_string()),
            ("web".to_string(), "active".to_string())
        ]
    );
    let state = kernel.state().unwrap();
    assert!(!state.devices.contains_key("stray"));
    assert!(
        !state.loops.contains_key(&leaked),
        "leaked loop not detached: {state:?}"
    );
    assert!(
        state.loops.contains_key(&theirs),
        "someone else's loop device detached: {state:?}"
    );
    {
        use vmar::kernel::Kernel;
        let info = kernel
            .loops()
            .unwrap()
            .into_iter()
            .find(|l| l.minor == theirs);
        kernel.loop_detach(&info.unwrap()).unwrap();
    }
    assert_eq!(kernel.read("web", 0, 4096).unwrap().len(), 4096);
    kernel.close_device("web").unwrap();
    check_invariants(dir.path(), &daemon);
    // An image changed while vmard was down: its device is reported, the rest restored.
    drop(daemon);
    kernel.dm_remove("base", false).unwrap();
    kernel.dm_remove("web", false).unwrap();
    std::fs::write(&images[1], vec![9u8; 64 * 4096]).unwrap();
    let daemon = Daemon::start_sim(dir.path(), "");
    let mut got = device_states(&daemon);
    got.sort();
    assert_eq!(got[0], ("base".to_string(), "active".to_string()));
    // Restored failed closed (issue 18.1), never as unchanged: reads of its changed image
    // fail.
    assert_eq!(got[2], ("web".to_string(), "image-changed".to_string()));
    assert!(kernel.read_device("web").is_err());
    assert_eq!(err(&daemon, &["create", "web2", "web"]), "image-changed");
}

#[test]
fn images_that_devices_read_cannot_be_forgotten_or_recaptured() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images);
    // web redirects into base: base is in use through web alone.
    ok(&daemon, &["create", "web", "web"]);
    assert_eq!(err(&daemon, &["forget", "base"]), "image-in-use");
    assert_eq!(err(&daemon, &["forget", "web"]), "image-in-use");
    // Touching base makes it "changed"; re-capturing it would change web's map under it.
    // (By path: the image guard refuses opens for writing of an image a device reads.)
    nix::unistd::truncate(
        &images[0],
        i64::try_from(std::fs::metadata(&images[0]).unwrap().len() + 4096).unwrap(),
    )
    .unwrap();
    assert_eq!(
        err(&daemon, &["capture", "--recapture", s(&images[0])]),
        "image-in-use"
    );
    ok(&daemon, &["remove", "web"]);
    ok(&daemon, &["capture", "--recapture", s(&images[0])]);
    ok(&daemon, &["forget", "db"]);
}

/// A fault step and which time it is reached (1 for the first).
type At = (Step, u32);

/// `at` as `VMAR_FAULTS` names it, with `action`.
fn fault(at: At, action: &str) -> String {
    format!("{}#{}={action}", at.0, at.1)
}

/// Every state-changing step of each operation.
const CREATE_STEPS: &[At] = &[
    (Step::LoopAttach, 1),
    (Step::CatalogCommit, 1),
    (Step::DmCreate, 1),
    (Step::DmLoad, 1),
    (Step::DmResume, 1),
    (Step::DmStats, 1),
    (Step::CatalogCommit, 2),
];
// (A refresh reuses the loop devices its device holds: it attaches none.)
const REFRESH_STEPS: &[At] = &[(Step::DmLoad, 1), (Step::DmSuspend, 1), (Step::DmResume, 1)];
const REMOVE_STEPS: &[At] = &[
    (Step::CatalogCommit, 1),
    (Step::DmRemove, 1),
    (Step::CatalogCommit, 2),
];

/// Runs `op` on a daemon that fails or dies at `step`, then restarts it cleanly and checks
/// the invariants; returns the restarted daemon.
fn fault_then_restart(dir: &Path, step: At, action: &str, op: &[&str]) -> Daemon {
    let faults = fault(step, action);
    eprintln!("fault: {op:?} with {faults}");
    // A start records the stamps of index runs that have settled (1 s old) in a commit of its
    // own: let a clean start do that now, so that the faulty one counts only the commits of
    // `op` (otherwise, on a loaded machine, `catalog.commit#1` hits the start instead).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    drop(Daemon::start_sim(dir, ""));
    let mut faulty = Daemon::start_sim(dir, &faults);
    let (succeeded, out) = faulty.json(op);
    if action == "kill" {
        assert!(!succeeded, "{op:?} with {faults} answered: {out}");
        assert!(faulty.exited(), "{faults} did not kill vmard");
    }
    drop(faulty);
    let daemon = Daemon::start_sim(dir, "");
    check_invariants(dir, &daemon);
    daemon
}

#[test]
fn a_fault_at_any_step_of_create_refresh_or_remove_is_repaired() {
    let mut cases = 0;
    for action in ["fail", "kill"] {
        for step in CREATE_STEPS {
            let dir = tempfile::tempdir().unwrap();
            let images = family(dir.path());
            let daemon = Daemon::start_sim(dir.path(), "");
            capture_all(&daemon, &images);
            ok(&daemon, &["create", "base", "base"]);
            drop(daemon);
            let daemon = fault_then_restart(dir.path(), *step, action, &["create", "web", "web"]);
            // Whatever happened, the name is usable: created, or free to create.
            let list = device_states(&daemon);
            if !list.iter().any(|(n, _)| n == "web") {
                ok(&daemon, &["create", "web", "web"]);
            }
            check_invariants(dir.path(), &daemon);
            cases += 1;
        }
        for step in REFRESH_STEPS {
            let dir = tempfile::tempdir().unwrap();
            let images = family(dir.path());
            let daemon = Daemon::start_sim(dir.path(), "");
            capture_all(&daemon, &images);
            ok(&daemon, &["create", "db", "db"]);
            drop(daemon);
            sim(dir.path()).open_device("db").unwrap();
            let daemon = fault_then_restart(dir.path(), *step, action, &["refresh", "db"]);
            assert_eq!(
                device_states(&daemon),
                [("db".to_string(), "active".to_string())],
                "{}",
                fault(*step, action)
            );
            cases += 1;
        }
        for step in REMOVE_STEPS {
            let dir = tempfile::tempdir().unwrap();
            let images = family(dir.path());
            let daemon = Daemon::start_sim(dir.path(), "");
            capture_all(&daemon, &images);
            ok(&daemon, &["create", "web", "web"]);
            drop(daemon);
            let daemon = fault_then_restart(dir.path(), *step, action, &["remove", "web"]);
            let list = device_states(&daemon);
            if action == "kill" && *step != (Step::CatalogCommit, 1) {
                // A removal interrupted once it is recorded is finished at restart, never
                // undone; killed before that, nothing happened.
                assert!(list.is_empty(), "{}: {list:?}", fault(*step, action));
            }
            if !list.is_empty() {
                ok(&daemon, &["remove", "web"]);
            }
            assert!(sim(dir.path()).state().unwrap().loops.is_empty());
            cases += 1;
        }
    }
    assert_eq!(
        cases,
        2 * (CREATE_STEPS.len() + REFRESH_STEPS.len() + REMOVE_STEPS.len())
    );
}

/// The steps of the catalog's changes, and the changes that reach each: forget writes no
/// digest list and hashes nothing.
const CATALOG_STEPS: &[(At, &[&str])] = &[
    ((Step::CaptureBatch, 1), &["capture", "recapture"]),
    ((Step::CaptureHashed, 1), &["capture", "recapture"]),
    ((Step::IndexWrite, 1), &["capture", "recapture", "forget"]),
    ((Step::DigestsWrite, 1), &["capture", "recapture"]),
    (
        (Step::CatalogCommit, 1),
        &["capture", "recapture", "forget"],
    ),
];

#[test]
fn a_kill_at_any_step_of_capture_recapture_or_forget_keeps_the_catalog_whole() {
    for &(step, ops) in CATALOG_STEPS {
        for &op in ops {
            let dir = tempfile::tempdir().unwrap();
            let images = family(dir.path());
            let daemon = Daemon::start_sim(dir.path(), "");
            capture_all(&daemon, &images[..2]);
            let before = ok(&daemon, &["images"]);
            drop(daemon);
            if op == "recapture" {
                std::fs::write(&images[1], vec![3u8; 8192]).unwrap();
            }
            let args: Vec<&str> = match op {
                "capture" => vec!["capture", s(&images[2])],
                "recapture" => vec!["capture", "--recapture", s(&images[1])],
                _ => vec!["forget", "base"],
            };
            let mut faulty = Daemon::start_sim(dir.path(), &fault(step, "kill"));
            let (succeeded, out) = faulty.json(&args);
            assert!(!succeeded && faulty.exited(), "{op} {step:?}: {out}");
            drop(faulty);
            let daemon = Daemon::start_sim(dir.path(), "");
            let after = ok(&daemon, &["images"]);
            assert_eq!(before, after, "{op} killed at {step:?} changed the catalog");
            for name in ["base", "web"] {
                if op != "recapture" || name == "base" {
                    let report = ok(&daemon, &["verify", name]);
                    assert_eq!(report["ok"], true, "{report}");
                }
            }
            // And the operation can be done now.
            ok(&daemon, &args);
        }
    }
}

#[test]
fn concurrent_changes_of_one_name_never_serve_the_wrong_image() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images);
    let served = std::sync::Mutex::new(std::collections::BTreeSet::new());
    for round in 0..12 {
        std::thread::scope(|scope| {
            let d = &daemon;
            let a = scope.spawn(move || d.json(&["create", "same", "web"]));
            let b = scope.spawn(move || d.json(&["remove", "same"]));
            let c = scope.spawn(move || d.json(&["create", "same", "db"]));
            for h in [a, b, c] {
                let (ok, out) = h.join().unwrap();
                if ok && let Some(image) = out["device"]["image"].as_str() {
                    served.lock().unwrap().insert(image.to_string());
                }
                // The name is bound to the first image it served: creating it over the
                // other one is refused as `name-bound`.
                if let Some(kind) = out["error"]["kind"].as_str() {
                    assert!(
                        ["device-exists", "unknown-device", "name-bound"].contains(&kind),
                        "round {round}: {out}"
                    );
                }
            }
        });
        check_invariants(dir.path(), &daemon);
    }
    // Whichever create won first, the name never served the other image.
    let served = served.into_inner().unwrap();
    assert_eq!(served.len(), 1, "{served:?}");
}

#[test]
fn sigterm_closes_the_catalog_and_leaves_devices() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images[..1]);
    ok(&daemon, &["create", "base", "base"]);
    let status = daemon.terminate();
    assert!(status.success(), "vmard exited with {status}");
    assert!(
        !dir.path().join("run/vmard.sock").exists(),
        "socket left behind"
    );
    // Closed, not merely left by an exiting process: redb's header (its "god byte", after
    // the 9-byte magic number) no longer asks for the repair that reads every page at the
    // next open. Threads that live until exit hold the catalog, so only an explicit close
    // clears it.
    let header = std::fs::read(dir.path().join("state/catalog.redb")).unwrap();
    assert_eq!(&header[..4], b"redb");
    assert_eq!(header[9] & 2, 0, "the catalog was left needing repair");
    assert!(
        sim(dir.path())
            .state()
            .unwrap()
            .devices
            .contains_key("base")
    );
    let daemon = Daemon::start_sim(dir.path(), "");
    assert_eq!(
        device_states(&daemon),
        [("base".to_string(), "active".to_string())]
    );
}

/// The steps of a restore with work of every kind (see the test below).
const RESTORE_STEPS: &[At] = &[
    (Step::DmCreate, 1),
    (Step::DmLoad, 1),
    (Step::DmResume, 1),
    (Step::DmSuspend, 1),
    (Step::DmClear, 1),
    (Step::DmRemove, 1),
    (Step::LoopDetach, 1),
];

#[test]
fn a_kill_during_restore_is_repaired_by_the_next_restore() {
    use vmar::kernel::Kernel;
    for &step in RESTORE_STEPS {
        let dir = tempfile::tempdir().unwrap();
        let images = family(dir.path());
        let daemon = Daemon::start_sim(dir.path(), "");
        capture_all(&daemon, &images);
        for name in ["base", "web", "db"] {
            ok(&daemon, &["create", name, name]);
        }
        ok(&daemon, &["remove", "db"]);
        ok(&daemon, &["create", "db", "db"]);
        drop(daemon);
        let kernel = sim(dir.path());
        // Restore has work: base missing, web suspended with its own table waiting (an
        // interrupted swap: cleared), db differing, a leftover without a record, and a loop
        // device a crash left without autoclear.
        kernel.dm_remove("base", false).unwrap();
        let table = kernel.dm_table("web").unwrap();
        kernel.dm_load("web", &table).unwrap();
        kernel.dm_suspend("web").unwrap();
        let mut other = kernel.dm_table("db").unwrap();
        other.truncate(1);
        kernel.dm_load("db", &other).unwrap();
        kernel.dm_resume("db").unwrap();
        kernel
            .dm_create("stray", &own_uuid(dir.path(), "stray"))
            .unwrap();
        kernel.plant_loop(&images[2], false).unwrap();
        let mut faulty = Daemon::launch_sim(dir.path(), &fault(step, "kill"));
        assert!(!faulty.ready(), "restore never reached {step:?}");
        drop(faulty);
        let daemon = Daemon::start_sim(dir.path(), "");
        let mut got = device_states(&daemon);
        got.sort();
        assert_eq!(
            got,
            [
                ("base".to_string(), "active".to_string()),
                ("db".to_string(), "active".to_string()),
                ("web".to_string(), "active".to_string())
            ],
            "restore killed at {step:?}"
        );
        check_invariants(dir.path(), &daemon);
    }
}

/// `dir` with the family captured and devices base, web and db, vmard stopped.
fn family_with_devices(dir: &Path) -> Vec<PathBuf> {
    let images = family(dir);
    let daemon = Daemon::start_sim(dir, "");
    capture_all(&daemon, &images);
    for name in ["base", "web", "db"] {
        ok(&daemon, &["create", name, name]);
    }
    drop(daemon);
    images
}

/// Every device active again, serving its image, after a clean start.
fn all_restored(dir: &Path, images_before: &Value) {
    let daemon = Daemon::start_sim(dir, "");
    assert_eq!(&ok(&daemon, &["images"]), images_before);
    let mut got = device_states(&daemon);
    got.sort();
    assert_eq!(
        got,
        ["base", "db", "web"].map(|n| (n.to_string(), "active".to_string()))
    );
    check_invariants(dir, &daemon);
}

/// Each fault step is in the list of a fault test, which runs an operation that reaches
/// it and asserts that a kill there killed vmard (so the step was reached) and what holds
/// after: a step added to [`Step::ALL`] without such a test fails here.
#[test]
fn every_fault_step_is_exercised_by_a_fault_test() {
    let lists: [(&str, Vec<At>); 7] = [
        ("CREATE_STEPS", CREATE_STEPS.to_vec()),
        ("REFRESH_STEPS", REFRESH_STEPS.to_vec()),
        ("REMOVE_STEPS", REMOVE_STEPS.to_vec()),
        (
            "CATALOG_STEPS",
            CATALOG_STEPS.iter().map(|(at, _)| *at).collect(),
        ),
        ("RESTORE_STEPS", RESTORE_STEPS.to_vec()),
        ("OPEN_STEPS", OPEN_STEPS.to_vec()),
        ("RECOVER_STEPS", RECOVER_STEPS.to_vec()),
    ];
    let exercised: std::collections::BTreeSet<Step> = lists
        .iter()
        .flat_map(|(_, list)| list.iter().map(|(step, _)| *step))
        .collect();
    let missing: Vec<&str> = Step::ALL
        .iter()
        .filter(|step| !exercised.contains(step))
        .map(|step| step.name())
        .collect();
    assert!(
        missing.is_empty(),
        "fault steps no fault test exercises: {missing:?}; add each to the list of the test \
         whose operation reaches it ({:?})",
        lists.map(|(name, _)| name)
    );
}

#[test]
fn a_misspelt_fault_step_stops_vmard_naming_the_steps() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("kernel");
    let started = Daemon::try_start_env(
        dir.path(),
        &dir.path().join("state"),
        &dir.path().join("run/vmard.sock"),
        &["--sim", s(&kernel)],
        &[("VMAR_FAULTS", "dm.lod=kill")],
    );
    let Err(stderr) = started else {
        panic!("vmard started with an unknown fault step");
    };
    assert!(
        stderr.contains("unknown fault step \"dm.lod\"") && stderr.contains("dm.load"),
        "{stderr}"
    );
}

/// The steps of opening the catalog at start.
const OPEN_STEPS: &[At] = &[(Step::CatalogInit, 1)];

#[test]
fn a_fault_at_the_catalogs_open_loses_nothing_and_says_where() {
    for (step, action) in OPEN_STEPS.iter().flat_map(|&s| [(s, "fail"), (s, "kill")]) {
        let dir = tempfile::tempdir().unwrap();
        family_with_devices(dir.path());
        let before = ok(&Daemon::start_sim(dir.path(), ""), &["images"]);
        let state = dir.path().join("state");
        let socket = dir.path().join("run/vmard.sock");
        let kernel = dir.path().join("kernel");
        let faults = fault(step, action);
        let started = Daemon::try_start_env(
            dir.path(),
            &state,
            &socket,
            &["--sim", s(&kernel)],
            &[("VMAR_FAULTS", &faults)],
        );
        let Err(stderr) = started else {
            panic!("vmard started through {faults}");
        };
        if action == "fail" {
            // The catalog cannot be opened: vmard stops, saying at which step.
            assert!(
                stderr.contains(&format!("injected fault at step {}", step.0)),
                "{stderr}"
            );
        }
        // The devices were left serving, and the next start has every record.
        assert_eq!(sim(dir.path()).state().unwrap().devices.len(), 3);
        all_restored(dir.path(), &before);
    }
}

#[test]
fn a_failed_clear_during_restore_fails_that_device_alone_and_is_repaired_next() {
    use vmar::kernel::Kernel;
    let dir = tempfile::tempdir().unwrap();
    family_with_devices(dir.path());
    let before = ok(&Daemon::start_sim(dir.path(), ""), &["images"]);
    // web is left as an interrupted swap to its own table leaves it: suspended, the table
    // waiting in the inactive slot. Restore clears that slot and resumes.
    let kernel = sim(dir.path());
    let table = kernel.dm_table("web").unwrap();
    kernel.dm_load("web", &table).unwrap();
    kernel.dm_suspend("web").unwrap();
    let state = dir.path().join("state");
    let socket = dir.path().join("run/vmard.sock");
    let kernel_dir = dir.path().join("kernel");
    let faults = format!("{}=fail", Step::DmClear);
    let daemon = Daemon::try_start_env(
        dir.path(),
        &state,
        &socket,
        &["--sim", s(&kernel_dir), "--retry-interval", "3600"],
        &[("VMAR_FAULTS", &faults)],
    )
    .expect("one device failing does not stop vmard");
    let (_, status) = daemon.document(&["restore-status"]);
    let failed = &status["report"]["failed"];
    assert_eq!(failed.as_array().map(Vec::len), Some(1), "{status}");
    assert_eq!(failed[0][0], "web", "{status}");
    assert!(
        failed[0][1]
            .as_str()
            .is_some_and(|why| why.contains("dm.clear")),
        "{status}"
    );
    for name in ["base", "db"] {
        assert_eq!(ok(&daemon, &["status", name])["state"], "active");
    }
    drop(daemon);
    all_restored(dir.path(), &before);
}

#[test]
fn devices_change_while_another_image_is_being_captured() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images[..2]);
    drop(daemon);
    // The capture of db stays between hashing and its commit for 3 s.
    let daemon = Daemon::start_sim(dir.path(), "capture.hashed=sleep:3000");
    std::thread::scope(|scope| {
        let d = &daemon;
        let capture = scope.spawn(move || {
            let out = d.json(&["capture", s(&images[2])]);
            (out, std::time::Instant::now())
        });
        std::thread::sleep(std::time::Duration::from_millis(500));
        ok(d, &["create", "web", "web"]);
        let created = std::time::Instant::now();
        let ((captured_ok, out), captured) = capture.join().unwrap();
        assert!(captured_ok, "{out}");
        assert!(
            created < captured,
            "create waited for the capture's hashing"
        );
    });
    check_invariants(dir.path(), &daemon);
}

/// vmard on the in-memory kernel with configuration `config` (written to `dir/vmar.toml`).
fn start_configured(dir: &Path, config: &str) -> Daemon {
    let path = dir.join("vmar.toml");
    std::fs::write(&path, config).unwrap();
    Daemon::start_env(
        dir,
        &dir.join("state"),
        &dir.join("run/vmard.sock"),
        &["--sim", s(&dir.join("kernel")), "--config", s(&path)],
        &[],
    )
}

/// Waits up to `seconds` until device `name` is `image-changed` because of `image`, with
/// `error` targets in its table (the state is saved before the table is swapped).
fn wait_failed_closed(daemon: &Daemon, name: &str, image: &str, seconds: u64) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while std::time::Instant::now() < deadline {
        let status = ok(daemon, &["status", name]);
        let because = status["changed_images"]
            .as_array()
            .is_some_and(|c| c.iter().any(|i| i == image));
        if status["state"] == "image-changed"
            && because
            && status["target_types"]["error"].as_u64().unwrap_or(0) > 0
        {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// Whether this process can have the kernel's fanotify permission events (root).
fn fanotify_available() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Opens `path` for writing, as `dd of=PATH conv=notrunc` does, and tells whether the
/// kernel refused it; waits up to 5 s for vmard to mark the image after a device change.
fn write_open_refused(path: &Path) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match std::fs::OpenOptions::new().write(true).open(path) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return true,
            Err(e) => panic!("open {}: {e}", path.display()),
            Ok(_) if std::time::Instant::now() > deadline => return false,
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// Issue 18.1: an image written under live devices. Opens for writing are refused by the
/// kernel (fanotify) while devices read the image, reads are not; a writer that opened
/// before any device existed is not stopped, but its write is found at once (FAN_MODIFY),
/// every device that reads the image (directly or through redirects) goes `image-changed`,
/// and its extents of that image fail with EIO while the rest still reads. The verdict
/// survives a restart; `refresh` will not serve the changed image again.
#[test]
fn writes_to_an_image_under_live_devices_are_refused_or_failed_closed() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    // Only events and device changes check: the interval plays no part here.
    let daemon = start_configured(dir.path(), "image_check_interval = 3600\n");
    capture_all(&daemon, &images);
    // Opened before any device reads base: no guard can refuse this one.
    let early = std::fs::OpenOptions::new()
        .write(true)
        .open(&images[0])
        .unwrap();
    for (name, image) in [("base", "base"), ("web", "web"), ("db", "db")] {
        ok(&daemon, &["create", name, image]);
    }
    let kernel = sim(dir.path());
    let guarded = fanotify_available();
    if guarded {
        assert!(
            write_open_refused(&images[0]),
            "an open for writing of a served image was allowed"
        );
        // Redirect targets and own images alike; reading stays allowed.
        assert!(write_open_refused(&images[1]));
        std::fs::File::open(&images[0]).expect("reading a served image is allowed");
        // A truncating open is refused too, and nothing was truncated.
        let truncating = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&images[2]);
        assert!(truncating.is_err());
        assert!(std::fs::metadata(&images[2]).unwrap().len() > 0);
    } else {
        eprintln!("fanotify refusal not checked: needs root");
    }
    assert!(device_states(&daemon).iter().all(|(_, st)| st == "active"));
    check_invariants(dir.path(), &daemon);

    // The early writer overwrites base in place.
    use std::os::unix::fs::FileExt;
    let base_len = std::fs::metadata(&images[0]).unwrap().len();
    early
        .write_all_at(&vec![0xab; usize::try_from(base_len).unwrap()], 0)
        .unwrap();
    if !guarded {
        daemon.signal(nix::sys::signal::Signal::SIGHUP);
    }
    for name in ["base", "web", "db"] {
        assert!(
            wait_failed_closed(&daemon, name, "base", 10),
            "{name} still {} after its image was overwritten",
            ok(&daemon, &["status", name])["state"]
        );
    }
    let status = ok(&daemon, &["status", "web", "--table"]);
    assert_eq!(
        status["changed_images"],
        serde_json::json!(["base"]),
        "{status}"
    );
    assert!(
        status["target_types"]["error"].as_u64().unwrap() > 0,
        "{status}"
    );
    let listed = ok(&daemon, &["list"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["state"] == "image-changed"),
        "{listed}"
    );
    // Fail closed: reads of base's extents fail, web's own blocks (40..64) still read.
    assert!(
        kernel.read_device("web").is_err(),
        "web serves base's new bytes"
    );
    assert!(kernel.read_device("base").is_err());
    let web = std::fs::read(&images[1]).unwrap();
    assert_eq!(
        kernel.read("web", 40 * 4096, 24 * 4096).unwrap(),
        web[40 * 4096..64 * 4096]
    );
    // Stats count the error extents as such, not as zeros.
    let stats = ok(&daemon, &["stats", "web"]);
    assert!(
        stats["devices"][0]["targets"]["error"].as_u64().unwrap() > 0,
        "{stats}"
    );
    // Refresh will not serve the changed image again.
    assert_eq!(err(&daemon, &["refresh", "web"]), "image-changed");
    // The verdict and the table survive a restart.
    drop(daemon);
    let daemon = start_configured(dir.path(), "image_check_interval = 3600\n");
    for name in ["base", "web", "db"] {
        assert_eq!(ok(&daemon, &["status", name])["state"], "image-changed");
    }
    assert!(kernel.read_device("web").is_err());
    assert_eq!(
        kernel.read("web", 40 * 4096, 24 * 4096).unwrap(),
        web[40 * 4096..64 * 4096]
    );
    // A new device over the changed image is refused; removing the old ones works.
    assert_eq!(err(&daemon, &["create", "web2", "web"]), "image-changed");
    for name in ["base", "web", "db"] {
        ok(&daemon, &["remove", name]);
    }
}

/// The window that remains, shown: where no event reports a write (here the permission
/// guard is off, as for a write from another NFS client), a device serves the new bytes
/// until the next check; the check (periodic, or SIGHUP as here) finds the change, and from
/// then on reads fail closed. A truncation by path is the same.
#[test]
fn a_write_nobody_reports_is_served_until_the_next_check() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let config = "refuse_image_writes = false\nimage_check_interval = 3600\n";
    let daemon = start_configured(dir.path(), config);
    capture_all(&daemon, &images);
    ok(&daemon, &["create", "web", "web"]);
    ok(&daemon, &["create", "db", "db"]);
    let kernel = sim(dir.path());
    // In place, through a new open: nothing refuses it.
    use std::os::unix::fs::FileExt;
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(&images[0])
        .unwrap();
    writer.write_all_at(&[0xcd; 4096 * 8], 0).unwrap();
    drop(writer);
    // The window: still "active", and web serves base's new bytes.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(ok(&daemon, &["status", "web"])["state"], "active");
    let served = kernel.read_device("web").unwrap();
    assert_ne!(served, std::fs::read(&images[1]).unwrap());
    // The next check closes it.
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(wait_failed_closed(&daemon, "web", "base", 10));
    assert!(kernel.read_device("web").is_err());
    // Truncation by path (no open at all) of db's own image.
    assert_eq!(ok(&daemon, &["status", "db"])["state"], "image-changed");
    let truncated = dir.path().join("db.raw");
    let dbs = std::fs::read(&truncated).unwrap();
    nix::unistd::truncate(&truncated, 4096).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(wait_failed_closed(&daemon, "db", "db", 10));
    let status = ok(&daemon, &["status", "db"]);
    let changed: Vec<&str> = status["changed_images"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        changed.contains(&"db") && changed.contains(&"base"),
        "{status}"
    );
    drop(dbs);
}

/// With the permission guard on, a truncation by path (which opens nothing, so no
/// permission event, and has no path for the permission group to report) is reported by
/// the guard's file-handle fanotify group and found at once, long before the interval.
#[test]
fn a_truncation_by_path_is_found_without_waiting_for_the_interval() {
    if !fanotify_available() {
        eprintln!("skipped: fanotify needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = start_configured(dir.path(), "image_check_interval = 3600\n");
    capture_all(&daemon, &images);
    ok(&daemon, &["create", "web", "web"]);
    assert!(write_open_refused(&images[0]));
    // Let the check the refusal asked for pass, so that only the truncation can wake one.
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(ok(&daemon, &["status", "web"])["state"], "active");
    nix::unistd::truncate(&images[0], 4096).unwrap();
    assert!(wait_failed_closed(&daemon, "web", "base", 10));
    assert!(sim(dir.path()).read_device("web").is_err());
}

/// Issue 18.1, block devices: a block-device image written in place. Writes through any
/// node of the device are found by its write counters at the next check; writes while vmard was not running are found by
/// sampled digests at restore, which no longer calls the device unchanged, and a new
/// create over the changed device is refused.
#[test]
fn a_block_device_image_written_in_place_is_refused_or_found() {
    let dir = tempfile::tempdir().unwrap();
    let files = family(dir.path());
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root for loop devices as block-device images");
        return;
    }
    let original_base = std::fs::read(&files[0]).unwrap();
    // Writable loop devices, as a volume manager's would be.
    let mut host = HostLoops(Vec::new());
    for file in &files[..2] {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!("skipped: no loop device");
            return;
        }
        host.0
            .push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let nodes: Vec<PathBuf> = ["base.dev", "web.dev"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    for (host_node, node) in host.0.iter().zip(&nodes) {
        alias_node(Path::new(host_node), node);
    }
    let config = "image_check_interval = 3600\n";
    let daemon = start_configured(dir.path(), config);
    for (node, name) in nodes.iter().zip(["base", "web"]) {
        ok(&daemon, &["capture", s(node), "--name", name]);
    }
    ok(&daemon, &["create", "web", "web"]);
    let kernel = sim(dir.path());
    // fanotify reports no opens of device nodes (regular files and directories only), so
    // writes to a block-device image are not refused: through any node of the device they
    // are found by its write counters at the next check.
    let write_all = |node: &str, byte: u8| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(node).unwrap();
        let len = std::fs::read(&files[0]).unwrap().len();
        f.write_all_at(&vec![byte; len], 0).unwrap();
        f.sync_all().unwrap();
    };
    write_all(&host.0[0], 0xee);
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_failed_closed(&daemon, "web", "base", 10),
        "web still {}",
        ok(&daemon, &["status", "web"])["state"]
    );
    assert!(kernel.read_device("web").is_err());
    ok(&daemon, &["remove", "web"]);
    drop(daemon);
    // Put base back as captured.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&host.0[0])
            .unwrap();
        f.write_all_at(&original_base, 0).unwrap();
        f.sync_all().unwrap();
    }

    // Written while vmard is down: counters know nothing, samples do.
    let daemon = start_configured(dir.path(), config);
    ok(&daemon, &["create", "solo", "web"]);
    drop(daemon);
    write_all(&host.0[1], 0x5a);
    let daemon = start_configured(dir.path(), config);
    let status = ok(&daemon, &["status", "solo"]);
    assert_eq!(status["state"], "image-changed", "{status}");
    assert!(kernel.read_device("solo").is_err());
    assert_eq!(err(&daemon, &["create", "solo2", "web"]), "image-changed");
    ok(&daemon, &["remove", "solo"]);
    drop(daemon);
    drop(host);
}
/// Runs `vmard --recover` on the sim kernel of `dir` with `faults`, waiting at most 60 s;
/// returns whether it was killed (SIGKILL) by a fault.
fn recover_killed_at(dir: &Path, faults: &str) -> bool {
    use std::os::unix::process::ExitStatusExt;
    let mut child = common::sim_vmard(dir, &["--recover"])
        .env("VMAR_FAULTS", faults)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.signal() == Some(9);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Every step of `vmard --recover` at which a kill must keep the records: while the new
/// catalog is built aside, once it is complete, once the swap is decided, and between each
/// rename of the swap (old catalog, index and backup moved aside, new ones moved in).
const RECOVER_STEPS: &[At] = &[
    (Step::CatalogCommit, 2),
    (Step::RecoverStaged, 1),
    (Step::RecoverMarked, 1),
    (Step::RecoverAside, 1),
    (Step::RecoverSwap, 1),
    (Step::RecoverAside, 2),
    (Step::RecoverSwap, 2),
    (Step::RecoverAside, 3),
    (Step::RecoverSwap, 3),
    (Step::RecoverSwapped, 1),
];

#[test]
fn a_kill_at_any_step_of_recovery_keeps_the_records_and_the_devices() {
    for &at in RECOVER_STEPS {
        let step = fault(at, "kill");
        let dir = tempfile::tempdir().unwrap();
        let images = family(dir.path());
        let daemon = Daemon::start_sim(dir.path(), "");
        capture_all(&daemon, &images);
        ok(&daemon, &["create", "web", "web"]);
        ok(&daemon, &["create", "db", "db"]);
        let names = |images: &Value| -> Vec<String> {
            images["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["name"].as_str().unwrap().to_string())
                .collect()
        };
        let before = names(&ok(&daemon, &["images"]));
        drop(daemon);
        // The catalog is damaged: what --recover is for.
        let catalog = dir.path().join("state/catalog.redb");
        std::fs::write(&catalog, vec![0x5a; 4096]).unwrap();
        assert!(
            recover_killed_at(dir.path(), &step),
            "--recover was not killed at {step}"
        );
        assert_eq!(
            sim(dir.path()).state().unwrap().devices.len(),
            2,
            "{step}: devices went"
        );
        let state = dir.path().join("state");
        let socket = dir.path().join("run/vmard.sock");
        let kernel = dir.path().join("kernel");
        let sim_args = ["--sim", s(&kernel)];
        // A plain start either finishes the recovery, or refuses and says to run it again.
        let daemon = match Daemon::try_start_env(dir.path(), &state, &socket, &sim_args, &[]) {
            Ok(daemon) => daemon,
            Err(stderr) => {
                assert!(stderr.contains("--recover"), "{step}: {stderr}");
                assert_eq!(sim(dir.path()).state().unwrap().devices.len(), 2);
                let mut args = sim_args.to_vec();
                args.push("--recover");
                Daemon::try_start_env(dir.path(), &state, &socket, &args, &[])
                    .unwrap_or_else(|e| panic!("{step}: recovery again failed: {e}"))
            }
        };
        assert_eq!(names(&ok(&daemon, &["images"])), before, "{step}");
        assert_eq!(
            device_states(&daemon),
            [
                ("db".to_string(), "active".to_string()),
                ("web".to_string(), "active".to_string())
            ],
            "{step}"
        );
        check_invariants(dir.path(), &daemon);
        // The old state is kept aside, never deleted.
        let aside: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("broken-"))
            .collect();
        assert_eq!(aside.len(), 1, "{step}");
        assert!(
            aside[0].path().join("backup/catalog.json").exists(),
            "{step}"
        );
        // And the next change snapshots a backup that holds every record.
        ok(&daemon, &["remove", "db"]);
        drop(daemon);
        let backup = vmar::backup::read(&state).unwrap();
        assert_eq!(backup.images.len(), before.len(), "{step}");
        assert_eq!(backup.devices.len(), 1, "{step}");
    }
}

// ---- monitoring and operations (issue 19) ----

/// A datagram socket standing in for systemd's NOTIFY_SOCKET.
struct Notify {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        Notify { socket, path }
    }

    /// The next message, or None after the read timeout.
    fn next(&self) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

#[test]
fn a_device_that_cannot_be_restored_is_reported_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images);
    ok(&daemon, &["create", "base", "base"]);
    ok(&daemon, &["create", "web", "web"]);
    assert!(daemon.ctl(&["restore-status"]).status.success());
    drop(daemon);
    // A reboot (the devices are gone) while web's image changed.
    use vmar::kernel::Kernel;
    let kernel = sim(dir.path());
    kernel.dm_remove("base", false).unwrap();
    kernel.dm_remove("web", false).unwrap();
    std::fs::write(&images[1], vec![9u8; 64 * 4096]).unwrap();
    let notify = Notify::bind(dir.path());
    // With the default policy a changed image is restored failed closed (its extents read
    // EIO); "report" refuses to serve it at all, which is the failure this test needs.
    let config = dir.path().join("vmar.toml");
    std::fs::write(&config, "on_image_change = \"report\"\n").unwrap();
    let daemon = Daemon::start_env(
        dir.path(),
        &dir.path().join("state"),
        &dir.path().join("run/vmard.sock"),
        &[
            "--sim",
            s(&dir.path().join("kernel")),
            "--config",
            s(&config),
            "--retry-interval",
            "1",
        ],
        &[("NOTIFY_SOCKET", s(&notify.path))],
    );
    // systemd's status line leads with the failure.
    let ready = notify.next().expect("vmard notifies systemd");
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(
        ready.contains("STATUS=DEGRADED: 1 not restored (web;"),
        "{ready}"
    );
    // And keeps it when the periodic retry (ten intervals) replaces the line.
    // (Ten one-second intervals; a loaded machine may take longer: up to three reads.)
    let retried = (0..3)
        .find_map(|_| notify.next().filter(|m| m.contains("periodic")))
        .expect("vmard's retry updates the status line");
    assert!(
        retried.starts_with("STATUS=DEGRADED: 1 not restored (web;")
            && retried.contains("periodic"),
        "{retried}"
    );
    // restore-status: exit 3, the device and why.
    let out = daemon.ctl(&["restore-status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("web (/dev/vmar/web): "),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (_, status) = daemon.document(&["restore-status"]);
    assert_eq!(status["report"]["failed"][0][0], "web", "{status}");
    assert_eq!(status["report"]["created"], serde_json::json!(["base"]));
    // list and status say why web is missing.
    let web = ok(&daemon, &["status", "web"]);
    assert_eq!(web["state"], "missing");
    let reason = web["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("restore at vmard's start failed") && reason.contains("web"),
        "{reason}"
    );
    let list = ok(&daemon, &["list"]);
    let base = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "base");
    assert!(base.unwrap().get("reason").is_none(), "{list}");
    // metrics.
    let out = daemon.ctl(&["metrics"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "vmar_restore_success 0",
        "vmar_restore_devices{outcome=\"failed\"} 1",
        "vmar_restore_devices{outcome=\"created\"} 1",
        "vmar_device_state{device=\"web\",node=\"/dev/vmar/web\",image=\"web\",state=\"missing\"} 1",
        "vmar_image_changed{image=\"web\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    // Removed outside vmar while vmard runs: a reason too.
    kernel.dm_remove("base", false).unwrap();
    let base = ok(&daemon, &["status", "base"]);
    assert!(
        base["reason"]
            .as_str()
            .is_some_and(|r| r.contains("removed outside vmar")),
        "{base}"
    );
}

#[test]
fn the_watchdog_is_pinged_while_vmard_answers() {
    let dir = tempfile::tempdir().unwrap();
    let notify = Notify::bind(dir.path());
    // WATCHDOG_PID must be vmard's own: the shell execs it, keeping its pid.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
        .arg(common::binary("vmard", env!("CARGO_BIN_EXE_vmard")))
        .args(["--image-root", s(dir.path()), "--sim"])
        .arg(dir.path().join("kernel"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("run/vmard.sock"))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "200000")
        .env("VMAR_LOG", "error")
        .spawn()
        .unwrap();
    let mut messages = Vec::new();
    let mut pings = 0;
    while pings < 3 {
        let Some(message) = notify.next() else { break };
        pings += usize::from(message.lines().any(|l| l == "WATCHDOG=1"));
        messages.push(message);
    }
    // Stopped (SIGSTOP), it neither answers nor pings; systemd would restart it.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    notify
        .socket
        .set_read_timeout(Some(std::time::Duration::from_millis(600)))
        .unwrap();
    while notify.next().is_some() {}
    let silent = notify.next();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(pings, 3, "no watchdog pings: {messages:?}");
    assert!(messages[0].contains("READY=1"), "{messages:?}");
    assert_eq!(silent, None, "pings while stopped");
}

#[test]
fn every_reader_of_an_image_is_named_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images);
    // web and db redirect into base; b0 serves base itself.
    ok(&daemon, &["create", "web", "web"]);
    ok(&daemon, &["create", "db", "db"]);
    ok(&daemon, &["create", "b0", "base"]);
    let (ok_, out) = daemon.json(&["forget", "base"]);
    assert!(!ok_);
    assert_eq!(out["error"]["kind"], "image-in-use");
    let message = out["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("devices b0, db, web"),
        "every blocker at once: {message}"
    );
    let dependents = ok(&daemon, &["dependents", "base"]);
    let names = |key: &str| -> Vec<String> {
        dependents[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("devices"), ["b0", "db", "web"]);
    assert_eq!(names("images"), ["web", "db"]);
    assert_eq!(dependents["devices"][1]["serves"], "db");
    assert_eq!(dependents["devices"][1]["node"], "/dev/vmar/db");
    assert!(dependents["images"][0]["blocks"].as_u64().unwrap() > 0);
    // web's own image is read only by web; nothing redirects to it.
    let web = ok(&daemon, &["dependents", "web"]);
    assert_eq!(web["devices"].as_array().unwrap().len(), 1);
    assert_eq!(web["images"], serde_json::json!([]));
    assert_eq!(err(&daemon, &["dependents", "nosuch"]), "unknown-image");
    // The text form lists the same.
    let out = daemon.ctl(&["dependents", "base"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("device  b0")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("image   db")), "{text}");
}

#[test]
fn devices_are_named_by_one_path_and_taken_by_any_of_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images);
    let created = ok(&daemon, &["create", "/dev/vmar/web", "web"]);
    assert_eq!(created["device"]["name"], "web");
    assert_eq!(created["device"]["node"], "/dev/vmar/web");
    for arg in ["web", "/dev/vmar/web", "/dev/mapper/vmar-web"] {
        let status = ok(&daemon, &["status", arg]);
        assert_eq!(status["name"], "web", "{arg}");
        assert_eq!(status["node"], "/dev/vmar/web");
        ok(&daemon, &["stats", arg]);
        ok(&daemon, &["refresh", arg]);
    }
    assert_eq!(ok(&daemon, &["list"])[0]["node"], "/dev/vmar/web");
    let out = daemon.ctl(&["status", "/dev/mapper/vmar-web"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("device      web (/dev/vmar/web)\n"),
        "{text}"
    );
    let out = daemon.ctl(&["libvirt-xml", "/dev/mapper/vmar-web"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("<source dev='/dev/vmar/web'/>"));
    // Not a vmar device's path: refused as a name.
    assert_eq!(
        err(&daemon, &["status", "/dev/mapper/other"]),
        "invalid-name"
    );
    ok(&daemon, &["remove", "/dev/mapper/vmar-web"]);
    assert_eq!(ok(&daemon, &["list"]), serde_json::json!([]));
}

/// The file of image `name` as `images` reports it.
fn file_of(daemon: &Daemon, name: &str) -> Value {
    let images = ok(daemon, &["images"]);
    images["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no image {name}: {images}"))["file"]
        .clone()
}

/// Links to the inode of `ino` in vmar's holds under `dir`.
fn links_to(dir: &Path, ino: u64) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    for sub in ["state/holds"] {
        for entry in std::fs::read_dir(dir.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.metadata().is_ok_and(|m| m.ino() == ino) {
                found.push(entry.path());
            }
        }
    }
    found
}

/// A reboot as the kernel sees it: every device and loop device gone.
fn reboot(dir: &Path) {
    use vmar::kernel::Kernel;
    let kernel = sim(dir);
    for name in kernel.dm_list().unwrap() {
        kernel.dm_remove(&name, false).unwrap();
    }
    assert!(kernel.state().unwrap().loops.is_empty());
}

/// An image whose every block is another image's (a copy: Nova's `_base` file of an image
/// captured already) gets a table without its own loop device; status and check must not
/// ask for one (the autoclear loop it would need is gone as soon as nothing holds it).
#[test]
fn a_device_of_an_image_read_wholly_from_others_is_active_and_checks_ok() {
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let copy = dir.path().join("copy.raw");
    std::fs::copy(&images[0], &copy).unwrap();
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &[images[0].clone(), copy.clone()]);
    ok(&daemon, &["create", "copy", "copy"]);
    assert_eq!(
        device_states(&daemon),
        [("copy".to_string(), "active".to_string())]
    );
    let check = daemon.ctl(&["check"]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert_eq!(
        sim(dir.path()).read_device("copy").unwrap(),
        std::fs::read(&copy).unwrap()
    );
    // And after a restart (restore plans it again).
    drop(daemon);
    let daemon = Daemon::start_sim(dir.path(), "");
    assert_eq!(
        device_states(&daemon),
        [("copy".to_string(), "active".to_string())]
    );
    assert_eq!(daemon.ctl(&["check"]).status.code(), Some(0));
}

#[test]
fn a_deleted_image_is_held_restored_after_a_reboot_and_released_when_unneeded() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images);
    let bytes: Vec<Vec<u8>> = images.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let inodes: Vec<u64> = images
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().ino())
        .collect();
    // Every captured file is held by vmar: one more link, in the state directory.
    for (name, path) in ["base", "web", "db"].iter().zip(&images) {
        let file = file_of(&daemon, name);
        assert_eq!(file["state"], "present", "{file}");
        let hold = PathBuf::from(file["hold"].as_str().unwrap());
        assert_eq!(
            std::fs::metadata(&hold).unwrap().ino(),
            std::fs::metadata(path).unwrap().ino()
        );
        assert_eq!(std::fs::metadata(path).unwrap().nlink(), 2);
    }
    // A captured, held image captures again as unchanged (the hold is not a foreign link).
    let again = ok(&daemon, &["capture", s(&images[0])]);
    assert_eq!(again[0]["result"]["status"], "unchanged", "{again}");
    ok(&daemon, &["create", "base", "base"]);
    ok(&daemon, &["create", "web", "web"]);
    // Nova's image cache manager deletes the _base files the instances no longer name.
    std::fs::remove_file(&images[0]).unwrap();
    std::fs::remove_file(&images[1]).unwrap();
    let kernel = sim(dir.path());
    assert_eq!(kernel.read_device("base").unwrap(), bytes[0]);
    assert_eq!(kernel.read_device("web").unwrap(), bytes[1]);
    let base = file_of(&daemon, "base");
    assert_eq!(base["state"], "gone", "{base}");
    assert!(base["hold"].is_string(), "{base}");
    assert_eq!(
        base["kept_by"]["devices"],
        serde_json::json!(["base", "web"])
    );
    assert_eq!(base["kept_by"]["images"], serde_json::json!(["web", "db"]));
    let table = String::from_utf8(daemon.ctl(&["images"]).stdout).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.contains("base.raw") && l.contains("gone (held)")),
        "{table}"
    );
    // Deleted by design (Nova) and served from the hold: nothing for a monitor to report.
    let check = daemon.ctl(&["check"]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // A reboot: the kernel forgets every device; vmard restores them from its holds.
    drop(daemon);
    reboot(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    assert_eq!(daemon.ctl(&["check"]).status.code(), Some(0));
    let mut got = device_states(&daemon);
    got.sort();
    assert_eq!(
        got,
        [
            ("base".to_string(), "active".to_string()),
            ("web".to_string(), "active".to_string())
        ]
    );
    assert_eq!(kernel.read_device("base").unwrap(), bytes[0]);
    assert_eq!(kernel.read_device("web").unwrap(), bytes[1]);
    // Page-cache figures of a deleted image come from its hold.
    let stats = ok(&daemon, &["stats", "base"]);
    assert!(
        stats["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["path"].as_str().unwrap().contains("/state/holds/")),
        "{stats}"
    );
    // A new device of a deleted image is served from the hold too.
    ok(&daemon, &["create", "web2", "web"]);
    assert_eq!(kernel.read_device("web2").unwrap(), bytes[1]);
    ok(&daemon, &["remove", "web2"]);
    // The last reader of web goes: nothing needs web's content (no map redirects into it),
    // so its hold goes and, with the loop device gone, its last link: the space is freed.
    ok(&daemon, &["remove", "web"]);
    let web = file_of(&daemon, "web");
    assert_eq!(web["state"], "gone");
    assert!(web["hold"].is_null(), "{web}");
    assert!(links_to(dir.path(), inodes[1]).is_empty());
    // base is still read by its device and by maps (web's and db's redirect into it).
    ok(&daemon, &["remove", "base"]);
    let base = file_of(&daemon, "base");
    assert!(base["hold"].is_string(), "{base}");
    assert_eq!(base["kept_by"]["devices"], serde_json::json!([]));
    assert!(!links_to(dir.path(), inodes[0]).is_empty());
    // Forgetting the deleted image releases its hold: nothing can need it any more.
    ok(&daemon, &["forget", "base"]);
    assert!(links_to(dir.path(), inodes[0]).is_empty());
    // A present image forgotten is its own file again, single-linked.
    ok(&daemon, &["forget", "db"]);
    assert_eq!(std::fs::metadata(&images[2]).unwrap().nlink(), 1);
    assert!(links_to(dir.path(), inodes[2]).is_empty());
}

#[test]
fn a_write_before_the_name_went_is_caught_by_hashing_the_held_file() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images[..1]);
    // A writer that opened the file before its device existed (the guard refuses later
    // opens for writing) writes and restores the mtime: unlinking changes the ctime anyway,
    // so only the content can tell.
    let mtime = std::fs::metadata(&images[0]).unwrap().modified().unwrap();
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(&images[0])
        .unwrap();
    ok(&daemon, &["create", "base", "base"]);
    writer.write_at(&[0x5a; 4096], 8 * 4096).unwrap();
    writer.set_modified(mtime).unwrap();
    std::fs::remove_file(&images[0]).unwrap();
    drop(writer);
    drop(daemon);
    reboot(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    // Not served: missing, or image-changed if the guard saw the write before the kill.
    let found = device_states(&daemon);
    assert!(
        found == [("base".to_string(), "missing".to_string())]
            || found == [("base".to_string(), "image-changed".to_string())],
        "{found:?}"
    );
    assert_eq!(err(&daemon, &["create", "again", "base"]), "image-changed");
}

/// A vmard on the simulated kernel of `dir/kernel` with its own state dir and socket:
/// several of them share one kernel, as vmards of different state dirs share a host.
fn start_on_shared_kernel(dir: &Path, tag: &str, args: &[&str]) -> Daemon {
    let kernel = dir.join("kernel");
    let mut all = vec!["--sim", s(&kernel)];
    all.extend_from_slice(args);
    Daemon::start_env(
        dir,
        &dir.join(format!("state-{tag}")),
        &dir.join(format!("run/{tag}.sock")),
        &all,
        &[],
    )
}

#[test]
fn devices_belong_to_the_state_dir_that_made_them() {
    use vmar::kernel::Kernel;
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    // B's own copies: A's hold on a file it captured is an extra link B's capture refuses.
    let b_dir = dir.path().join("b-images");
    std::fs::create_dir(&b_dir).unwrap();
    let b_images = family(&b_dir);
    let a = start_on_shared_kernel(dir.path(), "a", &[]);
    let b = start_on_shared_kernel(dir.path(), "b", &[]);
    capture_all(&a, &images);
    capture_all(&b, &b_images);
    ok(&a, &["create", "a1", "base"]);
    ok(&a, &["create", "shared-name", "web"]);
    ok(&b, &["create", "b1", "web"]);
    // B sees A's devices but may not change them.
    assert_eq!(err(&b, &["remove", "a1"]), "foreign-device");
    drop(a);
    drop(b);
    let kernel = sim(dir.path());
    let id = |tag: &str| {
        std::fs::read_to_string(dir.path().join(format!("state-{tag}/instance-id")))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_ne!(id("a"), id("b"));
    let uuid = |name: &str| kernel.state().unwrap().devices[name].uuid.clone();
    assert_eq!(uuid("a1"), format!("VMAR-{}-a1", id("a")));
    assert_eq!(uuid("b1"), format!("VMAR-{}-b1", id("b")));
    // While A is down its device shared-name goes (a reboot), and B takes the name.
    kernel.dm_remove("shared-name", false).unwrap();
    let b = start_on_shared_kernel(dir.path(), "b", &[]);
    ok(&b, &["create", "shared-name", "db"]);
    drop(b);
    let theirs = kernel.dm_table("shared-name").unwrap();
    // A device an older vmar made (VMAR-NAME) that A records is adopted: a1 is replaced by
    // one with the old UUID and the same table. One that nobody records is left alone.
    // (old first: it keeps a1's autoclear loop device attached while a1 is replaced.)
    let table = kernel.dm_table("a1").unwrap();
    kernel.dm_create("old", "VMAR-old").unwrap();
    kernel.dm_load("old", &table).unwrap();
    kernel.dm_resume("old").unwrap();
    kernel.dm_remove("a1", false).unwrap();
    kernel.dm_create("a1", "VMAR-a1").unwrap();
    kernel.dm_load("a1", &table).unwrap();
    kernel.dm_resume("a1").unwrap();

    // A starts: on main it removed B's idle b1 and the old one, and swapped its own table
    // into B's shared-name.
    let a = start_on_shared_kernel(dir.path(), "a", &[]);
    let live = kernel.state().unwrap().devices;
    assert!(live.contains_key("b1"), "A's restore removed B's device");
    assert!(
        live.contains_key("old"),
        "A's restore removed an unrecorded old device"
    );
    assert_eq!(
        kernel.dm_table("shared-name").unwrap(),
        theirs,
        "A's restore changed B's device"
    );
    assert_eq!(uuid("shared-name"), format!("VMAR-{}-shared-name", id("b")));
    assert_eq!(uuid("a1"), "VMAR-a1", "the adopted device was recreated");
    let mut got = device_states(&a);
    got.sort();
    let want = [
        ("a1", "active"),
        ("b1", "unmanaged"),
        ("old", "unmanaged"),
        ("shared-name", "foreign"),
    ];
    assert_eq!(
        got,
        want.map(|(n, st)| (n.to_string(), st.to_string())),
        "A's list"
    );
    // A reports its lost name, cannot touch B's devices, and can drop its own record.
    let check = a.ctl(&["check"]);
    assert_eq!(check.status.code(), Some(2));
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("CRITICAL: device shared-name: state foreign"),
        "{text}"
    );
    assert_eq!(err(&a, &["remove", "b1"]), "foreign-device");
    assert_eq!(err(&a, &["refresh", "shared-name"]), "foreign-device");
    ok(&a, &["remove", "shared-name"]);
    assert_eq!(kernel.dm_table("shared-name").unwrap(), theirs);
    // An unrecorded device of an older vmar can be removed by hand (cleaning up).
    ok(&a, &["remove", "old"]);
    assert_eq!(a.ctl(&["check"]).status.code(), Some(0));
    // A stray of A's own (a record lost) is still cleaned up at A's start.
    drop(a);
    kernel
        .dm_create("stray", &format!("VMAR-{}-stray", id("a")))
        .unwrap();
    let _a = start_on_shared_kernel(dir.path(), "a", &[]);
    let live = kernel.state().unwrap().devices;
    assert!(!live.contains_key("stray"), "A's own leftover stayed");
    assert!(live.contains_key("b1") && live.contains_key("shared-name"));
}

#[test]
fn a_missing_image_root_stops_only_the_devices_on_it() {
    use vmar::kernel::Kernel;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    // The remote root on another file system (tmpfs), as an NFS mount is: vmar cannot hold
    // its files, so a root that is not mounted really takes their content away.
    let remote_fs = tempfile::tempdir_in("/dev/shm").unwrap();
    let remote = remote_fs.path().join("remote");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::create_dir_all(&remote).unwrap();
    let ours = family(&local);
    write_image(&remote.join("far.raw"), &vec![Block::Unique(77); 8], 0);
    let kernel_dir = dir.path().join("kernel");
    let start = |args: &[&str]| {
        let mut all = vec!["--sim", s(&kernel_dir), "--image-root", s(&remote)];
        all.extend_from_slice(args);
        Daemon::start_env(
            &local,
            &dir.path().join("state"),
            &dir.path().join("run/vmard.sock"),
            &all,
            &[],
        )
    };
    let daemon = start(&[]);
    capture_all(&daemon, &ours);
    ok(&daemon, &["capture", s(&remote.join("far.raw"))]);
    ok(&daemon, &["create", "near", "web"]);
    ok(&daemon, &["create", "far", "far"]);
    assert_eq!(daemon.ctl(&["check"]).status.code(), Some(0));
    drop(daemon);
    // A reboot, and the remote root is not mounted yet.
    let kernel = sim(dir.path());
    kernel.dm_remove("near", false).unwrap();
    kernel.dm_remove("far", false).unwrap();
    let away = remote_fs.path().join("remote.unmounted");
    std::fs::rename(&remote, &away).unwrap();

    // vmard starts (on main it exited: "cannot resolve image root"), restores what it can
    // and says what it cannot.
    let daemon = start(&["--retry-interval", "1"]);
    let mut got = device_states(&daemon);
    got.sort();
    assert_eq!(
        got,
        [
            ("far".to_string(), "missing".to_string()),
            ("near".to_string(), "active".to_string())
        ]
    );
    let (_, ping) = daemon.document(&["ping"]);
    let roots = ping["vmard"]["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 2, "{ping}");
    assert!(roots[1]["error"].is_string(), "{ping}");
    assert!(roots[0]["error"].is_null(), "{ping}");
    assert!(ping["vmard"]["waiting"]["far"].is_string(), "{ping}");
    let check = daemon.ctl(&["check"]);
    assert_eq!(check.status.code(), Some(2));
    let text = String::from_utf8_lossy(&check.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("VMAR CRITICAL - 1 of 2 devices"),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("CRITICAL: device far: not served")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("WARNING: image root {}", remote.display()))),
        "{text}"
    );
    assert_eq!(lines.len(), 3, "one line per problem: {text}");
    let (_, json) = daemon.document(&["check"]);
    assert_eq!(json["status"], "critical");
    assert_eq!(json["problems"].as_array().unwrap().len(), 2);

    // The root is mounted: the waiting device comes back by itself.
    std::fs::rename(&away, &remote).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while device_states(&daemon).iter().any(|(_, st)| st != "active") {
        assert!(
            std::time::Instant::now() < deadline,
            "far not restored after its root appeared: {:?}",
            device_states(&daemon)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(daemon.ctl(&["check"]).status.code(), Some(0));
    check_invariants_at(&kernel, &daemon);
    drop(daemon);

    // Without waiting for the next look (a long interval), SIGHUP tries again at once.
    kernel.dm_remove("far", false).unwrap();
    std::fs::rename(&remote, &away).unwrap();
    let daemon = start(&["--retry-interval", "3600"]);
    assert!(device_states(&daemon).contains(&("far".to_string(), "missing".to_string())));
    std::fs::rename(&away, &remote).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while device_states(&daemon).iter().any(|(_, st)| st != "active") {
        assert!(
            std::time::Instant::now() < deadline,
            "far not restored at SIGHUP: {:?}",
            device_states(&daemon)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn check_reports_every_device_not_served_as_it_should_be() {
    use vmar::kernel::Kernel;
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture_all(&daemon, &images);
    let code = |daemon: &Daemon| daemon.ctl(&["check"]).status.code();
    // Nothing saved: OK.
    assert_eq!(code(&daemon), Some(0));
    for name in ["base", "web", "db"] {
        ok(&daemon, &["create", name, name]);
    }
    let out = daemon.ctl(&["check"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().next().unwrap(),
        "VMAR OK - 3 of 3 devices active and correct, 1 of 1 image roots usable | devices=3 devices_ok=3 roots=1 roots_ok=1"
    );
    let kernel = sim(dir.path());
    // Suspended.
    kernel.dm_suspend("web").unwrap();
    let out = daemon.ctl(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("CRITICAL: device web: suspended"));
    kernel.dm_resume("web").unwrap();
    assert_eq!(code(&daemon), Some(0));
    // A live table that is not the image's.
    let mut other = kernel.dm_table("db").unwrap();
    other.truncate(1);
    kernel.dm_load("db", &other).unwrap();
    kernel.dm_suspend("db").unwrap();
    kernel.dm_resume("db").unwrap();
    let out = daemon.ctl(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("CRITICAL: device db: its live table"));
    ok(&daemon, &["refresh", "db"]);
    assert_eq!(code(&daemon), Some(0));
    // A removal waiting for the last user: a warning; done, nothing.
    kernel.open_device("web").unwrap();
    ok(&daemon, &["remove", "web", "--deferred"]);
    let out = daemon.ctl(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("WARNING: device web: being removed"));
    kernel.close_device("web").unwrap();
    assert_eq!(code(&daemon), Some(0));
    // Gone from the kernel.
    kernel.dm_remove("base", false).unwrap();
    let out = daemon.ctl(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("CRITICAL: device base: not served"));
    ok(&daemon, &["remove", "base"]);
    assert_eq!(code(&daemon), Some(0));
    // An image changed under its live device (a write that kept the size; by path, since
    // the guard refuses opens for writing of served images).
    let mtime = std::fs::metadata(&images[2]).unwrap().modified().unwrap();
    let times = std::fs::FileTimes::new().set_modified(mtime + std::time::Duration::from_secs(5));
    let file = std::fs::File::open(&images[2]).unwrap();
    file.set_times(times).unwrap();
    drop(file);
    // The guard may be swapping db's table to fail closed meanwhile (suspended for a moment):
    // the report settles on the change.
    let says_changed = |report: &Value| {
        report["problems"].as_array().is_some_and(|p| {
            p.len() == 1
                && p[0]["subject"] == "device db"
                && p[0]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("changed"))
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut report = daemon.document(&["check"]).1;
    while !says_changed(&report) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        report = daemon.document(&["check"]).1;
    }
    assert_eq!(report["status"], "critical", "{report}");
    assert!(says_changed(&report), "{report}");
    // vmard not there: UNKNOWN, and the error document with --json.
    drop(daemon);
    let out = common::vmarctl(&dir.path().join("run/vmard.sock"), &["check"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("VMAR UNKNOWN - cannot ask vmard"));
    let out = common::vmarctl(&dir.path().join("run/vmard.sock"), &["--json", "check"]);
    assert_eq!(out.status.code(), Some(3));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["kind"], "daemon-unavailable", "{doc}");
}

/// [`check_invariants`] for images outside `dir`'s usual layout.
fn check_invariants_at(kernel: &SimKernel, daemon: &Daemon) {
    let state = kernel.state().unwrap();
    for (name, device) in &state.devices {
        assert!(!device.suspended, "device {name} left suspended");
        let status = ok(daemon, &["status", name]);
        let image = status["image"].as_str().unwrap();
        let images = ok(daemon, &["images"]);
        let path = images["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == image)
            .unwrap()["path"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            kernel.read_device(name).unwrap() == std::fs::read(path).unwrap(),
            "device {name} does not serve image {image}"
        );
    }
}
