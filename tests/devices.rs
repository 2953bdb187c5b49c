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
    kernel.dm_create("stray").unwrap();
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
        kernel.dm_create("stray").unwrap();
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
    assert!(states(&daemon).iter().all(|(_, st)| st == "active"));
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
