//! The device lifecycle on the in-memory kernel (`vmard --sim`), without root or a guest:
//! create, refresh, remove, list, status, stats and restore through the socket, every
//! outcome of restore and remove, a fault (error or kill) at every step of every device and
//! catalog change, and concurrent changes of one name. After each scenario the same
//! invariants are checked: no device suspended, every live device serves byte for byte the
//! image its record names, record and kernel agree, no loop device leaked.

mod common;

use std::path::{Path, PathBuf};

use common::{Block, Daemon, alias_node, s, write_image};
use serde_json::Value;
use vmar::kernel::sim::SimKernel;

/// Images sharing blocks: holes, zeros, shared and unique blocks, a partial last block.
fn family(dir: &Path) -> Vec<PathBuf> {
    let base: Vec<Block> = (0..64)
        .map(|i| match i % 10 {
            0 => Block::Hole,
            1 => Block::Zero,
            _ => Block::Shared((i % 40) as u8),
        })
        .collect();
    let mut web = base.clone();
    for (i, b) in web.iter_mut().enumerate().skip(40) {
        *b = Block::Unique(i as u64);
    }
    let mut db = base.clone();
    for (i, b) in db.iter_mut().enumerate().step_by(5) {
        *b = Block::Unique(1000 + i as u64);
    }
    let paths: Vec<PathBuf> = ["base", "web", "db"]
        .iter()
        .map(|n| dir.join(format!("{n}.raw")))
        .collect();
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

fn ok(daemon: &Daemon, args: &[&str]) -> Value {
    let (ok, out) = daemon.json(args);
    assert!(ok, "vmarctl {args:?}: {out}");
    out
}

fn err(daemon: &Daemon, args: &[&str]) -> String {
    let (ok, out) = daemon.json(args);
    assert!(!ok, "vmarctl {args:?} succeeded: {out}");
    // capture answers one entry per image.
    let error = if out.is_array() {
        &out[0]["error"]
    } else {
        &out["error"]
    };
    error["kind"].as_str().unwrap_or("?").to_string()
}

fn capture_all(daemon: &Daemon, images: &[PathBuf]) {
    for image in images {
        ok(daemon, &["capture", s(image)]);
    }
}

fn states(daemon: &Daemon) -> Vec<(String, String)> {
    ok(daemon, &["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
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
    for (name, st) in states(daemon) {
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
    for (name, st) in states(daemon) {
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
    assert_eq!(states(&daemon), [("web".to_string(), "active".to_string())]);
    let out = ok(&daemon, &["remove", "web", "--deferred"]);
    assert_eq!(out["deferred"], true, "{out}");
    assert_eq!(
        states(&daemon),
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
    assert_eq!(states(&daemon), [("db".to_string(), "differs".to_string())]);
    let out = ok(&daemon, &["refresh", "db"]);
    assert!(out["targets"].as_u64().unwrap() > 4, "{out}");
    assert_eq!(states(&daemon), [("db".to_string(), "active".to_string())]);
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
    let mut got = states(&daemon);
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
    let mut got = states(&daemon);
    got.sort();
    assert_eq!(got[0], ("base".to_string(), "active".to_string()));
    assert_eq!(got[2], ("web".to_string(), "missing".to_string()));
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
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(&images[0])
        .unwrap();
    file.set_len(std::fs::metadata(&images[0]).unwrap().len() + 4096)
        .unwrap();
    drop(file);
    assert_eq!(
        err(&daemon, &["capture", "--recapture", s(&images[0])]),
        "image-in-use"
    );
    ok(&daemon, &["remove", "web"]);
    ok(&daemon, &["capture", "--recapture", s(&images[0])]);
    ok(&daemon, &["forget", "db"]);
}

/// Every state-changing step of each operation, as VMAR_FAULTS names them.
const CREATE_STEPS: &[&str] = &[
    "loop.attach",
    "catalog.commit#1",
    "dm.create",
    "dm.load",
    "dm.resume",
    "dm.stats",
    "catalog.commit#2",
];
// (A refresh reuses the loop devices its device holds: it attaches none.)
const REFRESH_STEPS: &[&str] = &["dm.load", "dm.suspend", "dm.resume"];
const REMOVE_STEPS: &[&str] = &["catalog.commit#1", "dm.remove", "catalog.commit#2"];

/// Runs `op` on a daemon that fails or dies at `step`, then restarts it cleanly and checks
/// the invariants; returns the restarted daemon.
fn fault_then_restart(dir: &Path, step: &str, action: &str, op: &[&str]) -> Daemon {
    eprintln!("fault: {op:?} with {step}={action}");
    let mut faulty = Daemon::start_sim(dir, &format!("{step}={action}"));
    let (succeeded, out) = faulty.json(op);
    if action == "kill" {
        assert!(!succeeded, "{op:?} with {step}=kill answered: {out}");
        assert!(faulty.exited(), "{step}=kill did not kill vmard");
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
            let daemon = fault_then_restart(dir.path(), step, action, &["create", "web", "web"]);
            // Whatever happened, the name is usable: created, or free to create.
            let list = states(&daemon);
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
            let daemon = fault_then_restart(dir.path(), step, action, &["refresh", "db"]);
            assert_eq!(
                states(&daemon),
                [("db".to_string(), "active".to_string())],
                "{step}={action}"
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
            let daemon = fault_then_restart(dir.path(), step, action, &["remove", "web"]);
            let list = states(&daemon);
            if action == "kill" && *step != "catalog.commit#1" {
                // A removal interrupted once it is recorded is finished at restart, never
                // undone; killed before that, nothing happened.
                assert!(list.is_empty(), "{step}=kill: {list:?}");
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

#[test]
fn a_kill_at_any_step_of_capture_recapture_or_forget_keeps_the_catalog_whole() {
    let steps = ["index.write", "catalog.commit"];
    for step in steps {
        for op in ["capture", "recapture", "forget"] {
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
            let mut faulty = Daemon::start_sim(dir.path(), &format!("{step}=kill"));
            let (succeeded, out) = faulty.json(&args);
            assert!(!succeeded && faulty.exited(), "{op} {step}: {out}");
            drop(faulty);
            let daemon = Daemon::start_sim(dir.path(), "");
            let after = ok(&daemon, &["images"]);
            assert_eq!(before, after, "{op} killed at {step} changed the catalog");
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
    for round in 0..12 {
        std::thread::scope(|scope| {
            let d = &daemon;
            let a = scope.spawn(move || d.json(&["create", "same", "web"]));
            let b = scope.spawn(move || d.json(&["remove", "same"]));
            let c = scope.spawn(move || d.json(&["create", "same", "db"]));
            for h in [a, b, c] {
                let (_, out) = h.join().unwrap();
                if let Some(kind) = out["error"]["kind"].as_str() {
                    assert!(
                        ["device-exists", "unknown-device"].contains(&kind),
                        "round {round}: {out}"
                    );
                }
            }
        });
        check_invariants(dir.path(), &daemon);
    }
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
    assert!(
        sim(dir.path())
            .state()
            .unwrap()
            .devices
            .contains_key("base")
    );
    let daemon = Daemon::start_sim(dir.path(), "");
    assert_eq!(
        states(&daemon),
        [("base".to_string(), "active".to_string())]
    );
}

#[test]
fn a_kill_during_restore_is_repaired_by_the_next_restore() {
    use vmar::kernel::Kernel;
    for step in [
        "dm.create",
        "dm.load",
        "dm.resume",
        "dm.suspend",
        "dm.remove",
    ] {
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
        // Restore has work: base missing, web suspended with a table waiting, db differing,
        // and a leftover without a record.
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
        let mut faulty = Daemon::launch_sim(dir.path(), &format!("{step}=kill"));
        assert!(!faulty.ready(), "restore never reached {step}");
        drop(faulty);
        let daemon = Daemon::start_sim(dir.path(), "");
        let mut got = states(&daemon);
        got.sort();
        assert_eq!(
            got,
            [
                ("base".to_string(), "active".to_string()),
                ("db".to_string(), "active".to_string()),
                ("web".to_string(), "active".to_string())
            ],
            "restore killed at {step}"
        );
        check_invariants(dir.path(), &daemon);
    }
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
    let a = start_on_shared_kernel(dir.path(), "a", &[]);
    let b = start_on_shared_kernel(dir.path(), "b", &[]);
    capture_all(&a, &images);
    capture_all(&b, &images);
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
    let table = kernel.dm_table("a1").unwrap();
    kernel.dm_remove("a1", false).unwrap();
    kernel.dm_create("a1", "VMAR-a1").unwrap();
    kernel.dm_load("a1", &table).unwrap();
    kernel.dm_resume("a1").unwrap();
    kernel.dm_create("old", "VMAR-old").unwrap();
    kernel.dm_load("old", &table).unwrap();
    kernel.dm_resume("old").unwrap();

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
    let mut got = states(&a);
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
    let remote = dir.path().join("remote");
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
    let away = dir.path().join("remote.unmounted");
    std::fs::rename(&remote, &away).unwrap();

    // vmard starts (on main it exited: "cannot resolve image root"), restores what it can
    // and says what it cannot.
    let daemon = start(&["--retry-interval", "1"]);
    let mut got = states(&daemon);
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
    while states(&daemon).iter().any(|(_, st)| st != "active") {
        assert!(
            std::time::Instant::now() < deadline,
            "far not restored after its root appeared: {:?}",
            states(&daemon)
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
    assert!(states(&daemon).contains(&("far".to_string(), "missing".to_string())));
    std::fs::rename(&away, &remote).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while states(&daemon).iter().any(|(_, st)| st != "active") {
        assert!(
            std::time::Instant::now() < deadline,
            "far not restored at SIGHUP: {:?}",
            states(&daemon)
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
    // An image changed under its live device (a write that kept the size).
    let mtime = std::fs::metadata(&images[2]).unwrap().modified().unwrap();
    let file = std::fs::File::options()
        .write(true)
        .open(&images[2])
        .unwrap();
    file.set_modified(mtime + std::time::Duration::from_secs(5))
        .unwrap();
    drop(file);
    let (_, report) = daemon.document(&["check"]);
    assert_eq!(report["status"], "critical", "{report}");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report}");
    assert_eq!(problems[0]["subject"], "device db", "{report}");
    assert!(
        problems[0]["message"].as_str().unwrap().contains("changed"),
        "{report}"
    );
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
